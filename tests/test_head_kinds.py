"""Head kinds and what chooses between them: the linear head, --kind auto, --max-error and hmd's [training] keys."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import fill_bucket

from headmaster import HeadmasterError
from headmaster.cli import cli
from headmaster.config import config_from_dict
from headmaster.heads import (TrainConfig, clopper_pearson_upper, compare_kinds, head_fields, head_from_checkpoint,
                              read_checkpoint, save_checkpoint, train_linear, train_one, train_vectors)
from headmaster.heads.arrays import ArrayHead, array_meta
from headmaster.heads.checkpoint_meta import CheckpointCache, auto_suggestion, describe_goal, describe_selection
from headmaster.heads.cuts import choose_cut


def invoke(workspace: Path, *args: str):
    return CliRunner().invoke(cli, ["--workspace", str(workspace), "--no-progress", *args])


def blobs(n_per_class: int, n_classes: int, dim: int = 32, spread: float = 1.0, seed: int = 0,
          centres: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian classes around random centres (offset from the origin, so normalisation keeps them apart)."""
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = rng.normal(size=(n_classes, dim)) + 3.0
    y = np.repeat(np.arange(n_classes), n_per_class)
    x = centres[y] + rng.normal(size=(len(y), centres.shape[1])) * spread
    return x.astype(np.float32), y, centres


def xor(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Binary XOR on two dimensions (no linear boundary), beside a constant one that keeps the norms alike."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1, 1, size=(n, 2))
    x = np.concatenate([a, np.full((n, 1), 1.0), rng.normal(size=(n, 3)) * 0.05], axis=1)
    return x.astype(np.float32), ((a[:, 0] * a[:, 1]) > 0).astype(np.int64)


# -- the linear kind -------------------------------------------------------------------------------------------

def test_linear_checkpoint_loads_weights_only_and_numpy_scores_it_alike(tmp_path):
    x, y, _ = blobs(20, 3)
    classes = ["a", "b", "c"]
    ck = train_linear("h", classes, x, y, {c: [] for c in classes}, "m").checkpoint
    assert ck["kind"] == "linear" and ck["type"] == "multiclass"
    assert set(ck["model_state_dict"]) == {"input_mean", "linear.weight", "linear.bias"}
    assert ck["metadata"]["metrics"]["accuracy"] > 0.9
    path = tmp_path / "h.pt"
    save_checkpoint(ck, path)
    head = head_from_checkpoint(read_checkpoint(path))  # read_checkpoint: torch.load(weights_only=True)
    arrays = ArrayHead(array_meta(ck), {k: v.numpy() for k, v in ck["model_state_dict"].items()})
    probs = head.predict_proba(x)
    assert np.abs(arrays.predict_proba(x) - probs).max() < 1e-5
    assert (probs.argmax(axis=1) == y).mean() > 0.9


def test_linear_binary_head_has_a_threshold_and_starts_from_the_prototypes():
    x, y, _ = blobs(1, 2, seed=3)  # one image a class: validation falls back to training, the prototypes decide
    ck = train_linear("h", ["neg", "pos"], x, y, {}, "m").checkpoint
    assert ck["type"] == "binary" and 0 < ck["threshold"] < 1
    head = head_from_checkpoint(ck)
    assert list(head.predict_labels(head.predict_proba(x))) == [0, 1]


# -- --kind auto -----------------------------------------------------------------------------------------------

def test_auto_picks_the_prototype_with_few_images_a_class():
    x, y, _ = blobs(3, 5, dim=64, spread=2.5, seed=1)
    comparison = compare_kinds(list("abcde"), x, y, TrainConfig(epochs=20))
    assert comparison.chosen == "prototype", comparison.scores
    assert set(comparison.scores) == {"prototype", "linear", "mlp"} and comparison.repeats == 10


def test_auto_picks_the_mlp_for_a_non_linear_boundary():
    x, y = xor(400, seed=0)
    outcome = train_vectors("h", ["no", "yes"], x, y, {}, "m", "auto", TrainConfig(kind="auto"))
    selection = outcome.checkpoint["metadata"]["selection"]
    assert outcome.checkpoint["kind"] == "mlp", selection
    assert selection["scores"]["mlp"]["mean"] > selection["scores"]["linear"]["mean"] + 0.2
    line = describe_selection(selection)
    assert line.startswith("auto chose mlp: 0.") and "out-of-fold; prototype 0." in line


def test_auto_with_a_single_image_bucket_takes_the_prototype():
    x, y, _ = blobs(4, 2)
    y[0] = 2  # the third class has one image
    outcome = train_vectors("h", list("abc"), x, y, {}, "m", "auto", TrainConfig(kind="auto"))
    assert outcome.checkpoint["kind"] == "prototype"
    assert "single image" in describe_selection(outcome.checkpoint["metadata"]["selection"])


def test_ties_go_to_the_simpler_kind():
    x, y, _ = blobs(30, 2, spread=0.1)  # every kind is perfect
    assert compare_kinds(["a", "b"], x, y, TrainConfig(epochs=5), repeats=2).chosen == "prototype"


# -- --max-error -----------------------------------------------------------------------------------------------

def test_clopper_pearson_matches_the_beta_quantile():
    from scipy.stats import beta

    for k, n in ((0, 59), (5, 100), (30, 1000), (3, 7)):
        assert clopper_pearson_upper(k, n) == pytest.approx(beta.ppf(0.95, k + 1, n - k), abs=1e-6)
    assert clopper_pearson_upper(0, 0) == 1.0 and clopper_pearson_upper(4, 4) == 1.0


@pytest.mark.parametrize("n_classes, kind, per_class, spread", [(4, "prototype", 400, 1.5), (2, "linear", 200, 1.0)])
def test_max_error_holds_on_held_out_images_over_repeated_draws(n_classes, kind, per_class, spread):
    goal, errors, coverages = 0.05, [], []
    _, _, centres = blobs(1, n_classes, dim=16)
    for seed in range(4):
        x, y, _ = blobs(per_class, n_classes, spread=spread, seed=10 + seed, centres=centres)
        outcome = train_vectors("h", list("abcd"[:n_classes]), x, y, {}, "m", kind, TrainConfig(max_error=goal))
        promise = outcome.checkpoint["metadata"]["error_goal"]
        if not promise["reached"]:  # an honest bound on a few hundred images may not reach 5%: it sorts nothing
            assert promise["coverage"] == 0
            continue
        assert promise["bound"] <= goal and promise["error"] <= goal and 0 < promise["coverage"] <= 1
        head = head_from_checkpoint(outcome.checkpoint)
        xt, yt, _ = blobs(1000, n_classes, spread=spread, seed=100 + seed, centres=centres)
        decided = [(b, t) for (b, _), t in zip(head.decide(head.predict_proba(xt)), yt) if b != "uncertain"]
        errors.append(np.mean([b != "abcd"[t] for b, t in decided]))
        coverages.append(len(decided) / len(yt))
    assert len(errors) >= 2
    assert max(errors) <= goal + 0.02  # the bound's slack over a handful of draws
    assert np.mean(errors) <= goal
    assert min(coverages) > 0.3


def test_an_unreachable_goal_sorts_nothing():
    x, y, _ = blobs(40, 3, spread=6.0)
    outcome = train_vectors("h", list("abc"), x, y, {}, "m", "prototype", TrainConfig(max_error=0.001))
    goal = outcome.checkpoint["metadata"]["error_goal"]
    assert goal["reached"] is False and goal["coverage"] == 0
    head = head_from_checkpoint(outcome.checkpoint)
    assert {b for b, _ in head.decide(head.predict_proba(x))} == {"uncertain"}
    assert describe_goal(goal).startswith("sorts nothing: no cut keeps errors ≤ 0.1%")


def test_binary_band_moves_the_threshold_to_its_centre():
    rng = np.random.default_rng(0)
    y = np.array([0] * 300 + [1] * 300)
    p = np.r_[rng.uniform(0.0, 0.6, 300), rng.uniform(0.3, 1.0, 300)]  # overlap between 0.3 and 0.6
    cut = choose_cut("binary", y, np.stack([1 - p, p], axis=1), 0.05)
    assert cut.reached and cut.rule == "margin" and cut.bound <= 0.05
    lo, hi = cut.threshold - cut.value, cut.threshold + cut.value
    assert lo <= 0.3 + 1e-9 and hi >= 0.6 - 1e-9  # the overlap is uncertain
    assert 0.3 < cut.coverage < 0.8


# -- commands --------------------------------------------------------------------------------------------------

def test_linear_and_auto_heads_in_every_command(clip_ctx, colour_head, workspace, tmp_path):
    trained = invoke(workspace, "train", "--head", "colour", "--kind", "linear")
    assert trained.exit_code == 0, trained.output
    assert "Trained colour (binary linear, 2 classes, 48 images" in trained.output
    src = tmp_path / "src"
    fill_bucket(src, "red", 2, 500)
    fill_bucket(src, "blue", 2, 600)
    result = invoke(workspace, "classify", "--head", "colour", "--src", str(src), "--dest", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out").rglob("*.png"))) == 4
    assert "Kind: linear" in invoke(workspace, "status", "--head", "colour").output
    evaluated = invoke(workspace, "evaluate", "--head", "colour", "--repeats", "2", "--kind", "prototype")
    assert evaluated.exit_code == 0, evaluated.output

    auto = invoke(workspace, "train", "--head", "colour", "--kind", "auto", "--epochs", "5", "--max-error", "0.2")
    assert auto.exit_code == 0, auto.output
    assert "  auto chose " in auto.output and " out-of-fold" in auto.output
    ck = read_checkpoint(workspace / "out" / "colour.pt")
    assert ck["metadata"]["selection"]["chosen"] == ck["kind"] and "margin" in ck
    status = invoke(workspace, "status", "--head", "colour").output
    assert "Selection: auto chose" in status and "Error goal: sorts " in status
    again = invoke(workspace, "train", "--head", "colour", "--epochs", "5")
    assert "  auto chose " in again.output  # no --kind: auto stays auto
    ck = read_checkpoint(workspace / "out" / "colour.pt")
    assert ck["metadata"]["error_goal"]["max_error"] == 0.2 and "margin" in ck  # no --max-error: the goal stays
    export = invoke(workspace, "export", "--format", "onnx", "--dest", str(tmp_path / "onnx"))
    assert export.exit_code == 0, export.output
    meta = json.loads(next((tmp_path / "onnx").glob("*.json")).read_text())
    assert meta["heads"]["colour"]["kind"] == ck["kind"]
    assert meta["heads"]["colour"]["uncertain"]["margin"] == pytest.approx(ck["margin"])
    fields = head_fields(clip_ctx.workspace.head("colour"), CheckpointCache().summary(workspace / "out" / "colour.pt"))
    assert fields["selection"].startswith("auto chose ") and fields["sorts"].startswith("sorts ")


def test_max_error_0_drops_the_goal(clip_ctx, colour_head, workspace):
    assert invoke(workspace, "train", "--head", "colour", "--epochs", "3", "--max-error", "0.3").exit_code == 0
    assert read_checkpoint(workspace / "out" / "colour.pt")["metadata"]["error_goal"]["max_error"] == 0.3
    dropped = invoke(workspace, "train", "--head", "colour", "--epochs", "3", "--max-error", "0")
    assert dropped.exit_code == 0, dropped.output
    ck = read_checkpoint(workspace / "out" / "colour.pt")
    assert "error_goal" not in ck["metadata"] and "margin" not in ck
    assert "Error goal" not in invoke(workspace, "status", "--head", "colour").output


def test_train_flag_errors(clip_ctx, colour_head, workspace):
    bad = invoke(workspace, "train", "--head", "colour", "--max-error", "1.5")
    assert bad.exit_code == 2 and "--max-error" in bad.output
    kind = invoke(workspace, "train", "--head", "colour", "--kind", "forest")
    assert kind.exit_code == 2 and "'forest' is not one of" in kind.output


def test_status_suggests_auto_when_the_mlp_trails():
    comparison = {"scores": {"prototype": {"mean": 0.75}, "linear": {"mean": 0.76}, "mlp": {"mean": 0.69}}}
    assert "linear beats this MLP by 7 points out of fold: try `hm train --kind auto`" in \
        auto_suggestion("mlp", comparison)
    comparison["scores"]["mlp"]["mean"] = 0.75
    assert auto_suggestion("mlp", comparison) is None and auto_suggestion("linear", comparison) is None


# -- hmd: [training] kind and max_error, kept across every retrain ---------------------------------------------

def test_training_config_keys_are_checked():
    assert config_from_dict({}).training.kind == "auto" and config_from_dict({}).training.max_error == 0
    with pytest.raises(HeadmasterError, match="'training.kind' must be one of mlp, linear, prototype, auto"):
        config_from_dict({"training": {"kind": "forest"}})
    with pytest.raises(HeadmasterError, match="'training.max_error' must be 0"):
        config_from_dict({"training": {"max_error": 1.0}})


def test_worker_train_keeps_max_error_from_the_config_across_retrains(clip_ctx, colour_head, workspace):
    from headmaster.daemon.worker import Worker

    (workspace / "config.toml").write_text('[training]\nkind = "mlp"\nmax_error = 0.2\n')
    worker = Worker(clip_ctx)
    first = worker.train("colour", epochs=5, lr=1e-3, seed=0)
    assert first["kind"] == "mlp" and first["error_goal"]["max_error"] == 0.2
    before = read_checkpoint(workspace / "out" / "colour.pt")
    fill_bucket(colour_head / "red", "red", 2, 900)  # a burst of labels, same buckets: a warm start
    second = worker.train("colour", epochs=5, lr=1e-3, seed=0)
    after = read_checkpoint(workspace / "out" / "colour.pt")
    assert second["error_goal"]["max_error"] == 0.2 and "margin" in after
    assert after["metadata"]["error_goal"]["max_error"] == 0.2
    assert not torch.equal(before["model_state_dict"]["net.0.weight"], after["model_state_dict"]["net.0.weight"])
    (workspace / "config.toml").write_text('[training]\nkind = "prototype"\n')
    third = worker.train("colour", epochs=5, lr=1e-3, seed=0)
    assert third["kind"] == "prototype" and third["error_goal"] is None


def test_warm_start_reuses_the_previous_weights_only_for_the_same_buckets(clip_ctx, colour_head):
    from headmaster.heads.training import previous_checkpoint, warm_config

    train_one(clip_ctx, "colour", TrainConfig(epochs=3))
    previous = previous_checkpoint(clip_ctx, "colour")
    warm = warm_config(TrainConfig(warm_start=True), previous, ["blue", "red"], previous["input_dim"])
    assert warm.init_state is previous["model_state_dict"]
    assert warm_config(TrainConfig(), previous, ["blue", "green", "red"], previous["input_dim"]).init_state is None


def test_a_warm_auto_retrain_keeps_the_last_choice_until_the_head_grows():
    x, y, _ = blobs(20, 2)
    first = train_vectors("h", ["a", "b"], x, y, {}, "m", "auto", TrainConfig(kind="auto", epochs=5))
    selection = first.checkpoint["metadata"]["selection"]
    assert selection["images"] == 40
    selection = dict(selection, chosen="linear")  # as if linear had won last time
    few_more = train_vectors("h", ["a", "b"], x, y, {}, "m", "auto",
                             TrainConfig(kind="auto", previous_selection=selection))
    assert few_more.checkpoint["kind"] == "linear" and few_more.checkpoint["metadata"]["selection"]["chosen"] == "linear"
    x2, y2, _ = blobs(30, 2)  # 60 images: grown by half, compare again
    grown = train_vectors("h", ["a", "b"], x2, y2, {}, "m", "auto",
                          TrainConfig(kind="auto", epochs=5, previous_selection=selection))
    assert grown.checkpoint["metadata"]["selection"]["images"] == 60


def test_the_mlp_sits_out_while_a_bucket_has_two_images():
    x, y, _ = blobs(2, 4)
    comparison = compare_kinds(list("abcd"), x, y, TrainConfig(epochs=5), repeats=3)
    assert set(comparison.scores) == {"prototype", "linear"}
