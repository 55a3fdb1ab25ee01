"""Honest evaluation: repeated splits, prototype heads, calibration, model comparison, plots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import build_clip, fill_bucket
from PIL import Image

from headmaster import HeadmasterError
from headmaster.cli import cli
from headmaster.embedding import add_model
from headmaster.evaluation.calibration import calibrate_head, choose_threshold, out_of_fold, threshold_rows
from headmaster.evaluation.comparison import compare_models, format_comparison
from headmaster.evaluation.repeated import cumulative_accuracy, evaluate_vectors, format_evaluation
from headmaster.heads import (Interval, TrainConfig, binary_metrics, decide_paths, fit_logreg, head_from_checkpoint,
                              load_head, load_trained, read_checkpoint, save_checkpoint, t_quantile_975, train_head,
                              train_one)
from headmaster.heads.prototypes import PrototypeHead

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def blobs(n_per_class: list[int], dim: int = 16, spread: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes around random centres, offset from the origin so normalisation keeps them apart."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(n_per_class), dim)) + 4.0
    x = np.concatenate([centres[c] + rng.normal(scale=spread, size=(n, dim)) for c, n in enumerate(n_per_class)])
    y = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)])
    return x.astype(np.float32), y


def invoke(workspace: Path, *args: str):
    return CliRunner().invoke(cli, ["--workspace", str(workspace), "--no-progress", *args])


# -- statistics ---------------------------------------------------------------------------------------

def test_t_quantiles_and_interval():
    assert t_quantile_975(1) == pytest.approx(12.706)
    assert t_quantile_975(19) == pytest.approx(2.093)  # seed 004's n = 20
    assert t_quantile_975(60) == pytest.approx(2.000, abs=1e-3)
    assert t_quantile_975(120) == pytest.approx(1.980, abs=1e-3)
    iv = Interval.of([0.9, 0.92, 0.94, 0.96])
    sd = np.std([0.9, 0.92, 0.94, 0.96], ddof=1)
    assert iv.mean == pytest.approx(0.93)
    assert iv.half_width == pytest.approx(3.182 * sd / 2)
    assert math.isnan(Interval.of([0.5]).half_width)


def test_interval_narrows_as_repeats_grow():
    x, y = blobs([30, 30, 30], spread=4.0)
    classes = ["a", "b", "c"]
    few = evaluate_vectors(x, y, classes, ["prototype"], repeats=3, seed=0).results[0].accuracy
    many = evaluate_vectors(x, y, classes, ["prototype"], repeats=30, seed=0).results[0].accuracy
    assert 0 < many.half_width < few.half_width
    assert few.std > 0  # a noisy problem, so the interval is not trivially zero


def test_evaluation_reports_what_it_measured_on():
    x, y = blobs([20, 20, 20, 20, 20, 20], spread=3.0)
    ev = evaluate_vectors(x, y, [f"c{i}" for i in range(6)], ["prototype", "logreg"], repeats=4, test_size=0.25,
                          head="syn", model="none")
    text = format_evaluation(ev)
    assert "Measured on 120 images, 4 repeated stratified random splits (90 train / 30 test images each" in text
    assert "TOP-3" in text and "TOP-5" in text
    r = ev.results[0]
    assert r.top_k[5].mean >= r.top_k[3].mean >= r.accuracy.mean
    assert sum(r.class_tested.values()) == 4 * 30
    worst = r.worst_first()
    assert r.class_accuracy[worst[0]] == min(r.class_accuracy.values())


def test_cumulative_accuracy_function():
    shares, accs = cumulative_accuracy([1.0, 0.5, 0.75, 1.0], num_intervals=4)
    assert shares.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert accs.tolist() == [0.5, 0.5, 0.75, 1.0, 1.0]


def test_logreg_agrees_with_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    from headmaster.heads import prepare_inputs

    x, y = blobs([40, 25, 35], spread=3.0, seed=3)
    weight, bias = fit_logreg(x, y, 3)
    ours = (prepare_inputs(x) @ weight.T + bias).argmax(dim=1).numpy()
    ref = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000).fit(prepare_inputs(x).numpy(), y)
    assert (ours == ref.predict(prepare_inputs(x).numpy())).mean() >= 0.97


# -- prototype heads ------------------------------------------------------------------------------------

def test_prototype_head_classifies_colour_classes(clip_ctx, workspace, tmp_path):
    head = workspace / "heads" / "colour"
    for i, colour in enumerate(["red", "blue", "green"]):
        fill_bucket(head / colour, colour, 12, 100 * i)
    report = train_one(clip_ctx, "colour", TrainConfig(kind="prototype"))
    trained, model = load_trained(clip_ctx, "colour")
    assert trained.kind == "prototype"  # load_trained scores with numpy; the checkpoint's module is the prototype
    assert isinstance(load_head(clip_ctx.workspace.checkpoint_path("colour")).module, PrototypeHead)
    assert report.metrics["accuracy"] == 1.0
    fresh = []
    for i, colour in enumerate(["red", "blue", "green"]):
        fresh += fill_bucket(tmp_path / "new", colour, 3, 900 + 10 * i)
    decisions, _ = decide_paths(clip_ctx, trained, model, fresh)
    assert [d.bucket for d in decisions] == [p.name.split("_")[0] for p in fresh]


def test_adding_a_class_or_image_changes_only_that_prototype(clip_ctx, workspace):
    head = workspace / "heads" / "colour"
    fill_bucket(head / "red", "red", 10, 0)
    fill_bucket(head / "blue", "blue", 10, 100)
    path = clip_ctx.workspace.checkpoint_path("colour")

    def prototypes() -> dict[str, torch.Tensor]:
        ck = read_checkpoint(path)
        return dict(zip(ck["classes"], ck["model_state_dict"]["prototypes"]))

    train_one(clip_ctx, "colour", TrainConfig(kind="prototype"))
    before = prototypes()
    fill_bucket(head / "green", "green", 10, 200)
    train_one(clip_ctx, "colour", TrainConfig(kind="prototype"))
    after = prototypes()
    assert set(after) == {"blue", "green", "red"}
    assert torch.equal(after["red"], before["red"]) and torch.equal(after["blue"], before["blue"])
    fill_bucket(head / "red", "red", 1, 50)
    train_one(clip_ctx, "colour", TrainConfig(kind="prototype"))
    again = prototypes()
    assert not torch.equal(again["red"], after["red"])
    assert torch.equal(again["blue"], after["blue"]) and torch.equal(again["green"], after["green"])


def test_checkpoint_layout_and_kind_dispatch(tmp_path):
    x, y = blobs([20, 20])
    sources = {"neg": ["h/neg/a.png"], "pos": ["h/pos/b.png"]}
    from headmaster.heads import train_prototypes

    proto = train_prototypes("h", ["neg", "pos"], x, y, sources, "m").checkpoint
    assert set(proto) == {"type", "kind", "input_dim", "model", "model_state_dict", "threshold", "classes",
                          "sources", "metadata"}
    assert proto["kind"] == "prototype" and proto["type"] == "binary" and proto["threshold"] == 0.5
    assert proto["model_state_dict"]["prototypes"].shape == (2, 16)
    mlp = train_head("h", ["neg", "pos"], x, y, sources, "m", TrainConfig(epochs=2)).checkpoint
    assert mlp["kind"] == "mlp"
    save_checkpoint(proto, tmp_path / "p.pt")
    del mlp["kind"]  # checkpoints written before the key existed load as MLPs
    save_checkpoint(mlp, tmp_path / "m.pt")
    p, m = load_head(tmp_path / "p.pt"), load_head(tmp_path / "m.pt")
    assert p.kind == "prototype" and m.kind == "mlp"
    assert (p.predict_labels(p.predict_proba(x)) == y).mean() >= 0.95
    proto["kind"] = "forest"
    save_checkpoint(proto, tmp_path / "bad.pt")
    with pytest.raises(HeadmasterError, match="unknown head kind 'forest'"):
        load_head(tmp_path / "bad.pt")


def test_decide_honours_stored_min_confidence():
    x, y = blobs([10, 10, 10])
    from headmaster.heads import train_prototypes

    ck = train_prototypes("h", ["a", "b", "c"], x, y, {}, "m").checkpoint
    probs = np.array([[0.8, 0.1, 0.1]])
    assert head_from_checkpoint(ck).decide(probs)[0][0] == "a"
    ck["min_confidence"] = 0.9
    assert head_from_checkpoint(ck).decide(probs)[0] == ("uncertain", pytest.approx(0.8))


# -- calibration --------------------------------------------------------------------------------------

def test_target_precision_threshold_meets_target_out_of_fold():
    x, y = blobs([120, 60], spread=5.0, seed=1)
    oof = out_of_fold(x, y, ["neg", "pos"], "logreg", repeats=10, test_size=0.25, seed=0)
    rows = threshold_rows(oof.labels, oof.probs[:, 1])
    at_half = binary_metrics(oof.labels, oof.probs[:, 1], 0.5)["precision"]
    target = round(min(0.97, at_half + 0.1), 2)
    assert at_half < target  # the default threshold misses the target: calibration has to move it
    chosen = choose_threshold(rows, target_precision=target)
    assert chosen.threshold > 0.5
    m = binary_metrics(oof.labels, oof.probs[:, 1], chosen.threshold)
    assert m["precision"] >= target and m["recall"] == pytest.approx(chosen.recall) and m["recall"] > 0
    # no threshold with more recall reaches the target
    assert all(r.precision < target or r.recall <= chosen.recall for r in rows if r.positive > 0)
    with pytest.raises(HeadmasterError, match="no threshold reaches precision"):
        choose_threshold([r for r in rows if r.precision < target], target_precision=target)


def test_calibrate_cli_stores_threshold_and_draws_pr_curve(clip_ctx, colour_head, workspace, tmp_path):
    train_one(clip_ctx, "colour", TrainConfig(kind="prototype", threshold=0.3))
    plot = tmp_path / "pr.png"
    result = invoke(workspace, "calibrate", "--head", "colour", "--target-precision", "0.9", "--repeats", "4",
                    "--plot", str(plot))
    assert result.exit_code == 0, result.output
    assert "Measured on 40 out-of-fold scores of 48 images from 4 repeated stratified random splits" in result.output
    ck = read_checkpoint(clip_ctx.workspace.checkpoint_path("colour"))
    assert ck["threshold"] != 0.3 and ck["metadata"]["calibration"]["goal"] == "precision >= 0.9"
    assert ck["metadata"]["calibration"]["precision"] >= 0.9
    assert ck["kind"] == "prototype" and "model_state_dict" in ck
    assert f"Chosen threshold {ck['threshold']:.2f}" in result.output
    assert_png(plot)
    wrong = invoke(workspace, "calibrate", "--head", "colour", "--min-confidence", "0.7")
    assert wrong.exit_code == 1 and "Error: --min-confidence is for multi-class heads" in wrong.output


def test_calibrate_multiclass_stores_cut(clip_ctx, workspace):
    head = workspace / "heads" / "colour"
    for i, colour in enumerate(["red", "blue", "green"]):
        fill_bucket(head / colour, colour, 8, 100 * i)
    train_one(clip_ctx, "colour", TrainConfig(kind="prototype"))
    shown = calibrate_head(clip_ctx, "colour", repeats=3)
    assert shown.stored is None and len(shown.rows) > 5
    assert read_checkpoint(clip_ctx.workspace.checkpoint_path("colour")).get("min_confidence") is None
    cal = calibrate_head(clip_ctx, "colour", min_confidence=0.75, repeats=3)
    assert cal.chosen.cut == 0.75 and 0 <= cal.chosen.uncertain <= 1
    assert load_head(clip_ctx.workspace.checkpoint_path("colour")).min_confidence == 0.75


# -- model comparison -----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def blind_clip_path(models_dir) -> Path:
    """A tiny CLIP that sees nothing: its patch embedding is zero, so every image gives the same vector."""
    from transformers import CLIPModel

    folder = build_clip(models_dir / "blind-clip")
    model = CLIPModel.from_pretrained(folder)
    with torch.no_grad():
        model.vision_model.embeddings.patch_embedding.weight.zero_()
    model.save_pretrained(folder)
    return folder


def test_compare_models_ranks_signal_above_blind(clip_ctx, colour_head, blind_clip_path):
    add_model(clip_ctx.store, "blind-clip", str(blind_clip_path), 24)
    result = compare_models(clip_ctx, "colour", kind="prototype", repeats=6)
    names = [s.model.name for s in result.scores]
    assert names == ["tiny-clip", "blind-clip"]
    signal, blind = result.scores
    assert signal.result.accuracy.mean >= 0.9
    assert blind.result.accuracy.high < signal.result.accuracy.low
    assert signal.ms_per_image > 0 and signal.dim == 24 and blind.embedded_now == 48
    text = format_comparison(result)
    assert "48 images, 6 repeated stratified random splits" in text
    assert text.index("tiny-clip ") < text.index("blind-clip ")
    with pytest.raises(HeadmasterError, match="unknown model"):
        compare_models(clip_ctx, "colour", ["nope"])


def test_compare_models_reports_a_model_that_cannot_load(clip_ctx, colour_head, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    clip_ctx.store.add_model("broken", str(broken), 24)  # registered, then its folder broke
    result = compare_models(clip_ctx, "colour", kind="prototype", repeats=2)
    assert [s.model.name for s in result.scores] == ["tiny-clip"]
    assert "broken" in result.failed and "Not measured: broken: cannot load model" in format_comparison(result)


def test_compare_models_cli(clip_ctx, colour_head, workspace):
    result = invoke(workspace, "compare-models", "--head", "colour", "--models", "tiny-clip", "--kind", "logreg",
                    "--repeats", "3")
    assert result.exit_code == 0, result.output
    assert "logreg heads on each model's vectors, 48 images, 3 repeated" in result.output
    assert "tiny-clip" in result.output and "MS/IMAGE" in result.output


# -- evaluate and plots through the CLI ----------------------------------------------------------------

def test_evaluate_cli_all_kinds_with_plot(clip_ctx, colour_head, workspace, tmp_path):
    plot = tmp_path / "caf.png"
    result = invoke(workspace, "evaluate", "--head", "colour", "--repeats", "3", "--plot", str(plot))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Measured on 48 images, 3 repeated stratified random splits (38 train / 10 test images each" in out
    for kind in ("mlp", "prototype", "logreg"):
        assert f"\n{kind} " in out
    assert "Cumulative accuracy function" in out and "Per-class accuracy" in out
    assert_png(plot)
    missing = invoke(workspace, "evaluate", "--head", "colour", "--repeats", "2", "--kind", "prototype",
                     "--plot", str(tmp_path / "no" / "x.png"))
    assert missing.exit_code == 1 and "Error: cannot write" in missing.output
    unknown = invoke(workspace, "evaluate", "--head", "nope")
    assert unknown.exit_code == 1 and unknown.output.startswith("Error:")


def test_train_kind_prototype_and_confusion_plot(clip_ctx, colour_head, workspace, tmp_path):
    trained = invoke(workspace, "train", "--head", "colour", "--kind", "prototype")
    assert trained.exit_code == 0, trained.output
    assert "Trained colour (binary prototype, 2 classes, 48 images" in trained.output
    status = invoke(workspace, "status", "--head", "colour")
    assert "Kind: prototype" in status.output
    for colour, start in (("red", 700), ("blue", 800)):
        fill_bucket(workspace / "test" / "colour" / colour, colour, 4, start)
    plot = tmp_path / "cm.png"
    result = invoke(workspace, "confusion-matrix", "--head", "colour", "--plot", str(plot))
    assert result.exit_code == 0, result.output
    assert "Accuracy: 8/8 (100.0%)" in result.output
    assert_png(plot)
    again = invoke(workspace, "train", "--head", "colour")  # no --kind: keeps the checkpoint's kind
    assert "Trained colour (binary prototype," in again.output
    switched = invoke(workspace, "train", "--head", "colour", "--kind", "mlp", "--epochs", "3")
    assert "Trained colour (binary, 2 classes" in switched.output
    assert read_checkpoint(clip_ctx.workspace.checkpoint_path("colour"))["kind"] == "mlp"


def test_a_single_image_class_is_reported_as_never_tested():
    x, y = blobs([12, 12, 1])
    ev = evaluate_vectors(x, y, ["a", "b", "lonely"], ["prototype"], repeats=2)
    assert ev.results[0].class_tested["lonely"] == 0
    assert "never tested: lonely" in format_evaluation(ev)


def test_calibrate_refuses_binary_options_for_multiclass_heads(clip_ctx, workspace):
    head = workspace / "heads" / "colour"
    for i, colour in enumerate(["red", "blue", "green"]):
        fill_bucket(head / colour, colour, 6, 100 * i)
    result = invoke(workspace, "calibrate", "--head", "colour")
    assert result.exit_code == 1 and "is not trained yet" in result.output
    train_one(clip_ctx, "colour", TrainConfig(kind="prototype"))
    result = invoke(workspace, "calibrate", "--head", "colour", "--target-precision", "0.9")
    assert result.exit_code == 1
    assert "Error: --target-precision, --target-recall and --f1 are for binary" in result.output
    both = invoke(workspace, "calibrate", "--head", "colour", "--f1", "--target-recall", "0.8")
    assert both.exit_code == 1 and "choose one of" in both.output
