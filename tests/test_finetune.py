"""hm finetune: LP-FT with LoRA on tiny random models of the real architectures."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import build_clip, colour_image, fill_bucket
from PIL import Image
from test_cli import hm  # noqa: F401  (the fixture that runs hm commands in-process)

from headmaster import HeadmasterError
from headmaster.embedding import (Context, EmbedOptions, activate_model, add_model, embed_paths, load_embedder,
                                  vectors_for)
from headmaster.embedding.adapted import RECORD_NAME, WEIGHTS_NAME
from headmaster.finetune.data import views_that_fit
from headmaster.finetune.train import FinetuneConfig, StopRequest, finetune, keep_if_retrained_heads_win
from headmaster.heads import TrainConfig, load_head, read_checkpoint, train_one


def _two_heads(workspace: Path) -> None:
    fill_bucket(workspace / "heads" / "colour" / "red", "red", 10, 0)
    fill_bucket(workspace / "heads" / "colour" / "blue", "blue", 10, 100)
    fill_bucket(workspace / "heads" / "warm" / "yellow", "yellow", 10, 200)
    fill_bucket(workspace / "heads" / "warm" / "green", "green", 10, 300)


def _cached(workspace: Path, model: str) -> dict[str, np.ndarray]:
    with Context.open(str(workspace)) as c:
        m = c.store.model(model)
        rows = c.store.conn.execute("SELECT hash FROM embeddings WHERE model_id = ?", (m.id,)).fetchall()
        return c.store.vectors(m.id, [r[0] for r in rows])


@pytest.mark.parametrize("fixture, dim", [("timm_path", 256), ("clip_path", 24), ("dinov2_path", 32)])
def test_finetune_end_to_end(hm, workspace, request, fixture, dim):
    _two_heads(workspace)
    hm("model-add", "--name", "base", "--path", str(request.getfixturevalue(fixture)), "--dim", str(dim))
    out = hm("finetune", "--heads", "colour,warm", "--ft-epochs", "2", "--activate").output
    assert "Stage 1 (frozen backbone): colour accuracy" in out
    assert re.search(r"Validation accuracy: frozen [\d.]+ -> fine-tuned [\d.]+ \(best epoch \d\)", out), out
    folder = workspace / "models" / "base-ft-colour-warm"
    assert (folder / WEIGHTS_NAME).is_file() and (folder / RECORD_NAME).is_file()
    record = json.loads((folder / RECORD_NAME).read_text())
    assert record["base"] == {"name": "base", "path": str(request.getfixturevalue(fixture)), "dim": dim}
    assert set(record["heads"]) == {"colour", "warm"} and len(record["epochs"]) == 3
    # a head's validation images are never trained on: the two sets are disjoint and cover every image
    assert record["images"]["train"] + record["images"]["validation"] == 40
    assert record["images"]["validation"] == sum(h["validation"] for h in record["heads"].values()) == 8
    assert re.search(r"^\* base-ft-colour-warm\s+%d\s+40\s" % dim, hm("model-list").output, re.M)
    for head in ("colour", "warm"):  # retrained on the new model's vectors, and the checkpoint names it
        assert torch.load(workspace / "out" / f"{head}.pt", weights_only=True)["model"] == "base-ft-colour-warm"

    # the vectors written from the replayed trunk are what the registered model (adapters merged) computes
    written = _cached(workspace, "base-ft-colour-warm")
    with Context.open(str(workspace)) as c:
        c.store.conn.execute("DELETE FROM embeddings WHERE model_id = ?", (c.store.model("base-ft-colour-warm").id,))
    assert "Embedded 40 images with base-ft-colour-warm (0 cached)" in hm("embed").output
    recomputed = _cached(workspace, "base-ft-colour-warm")
    assert set(recomputed) == set(written)
    for h in written:
        np.testing.assert_allclose(recomputed[h], written[h], rtol=1e-3, atol=1e-4)
    base = _cached(workspace, "base")
    moved = [float(np.abs(base[h] - written[h]).max() / np.abs(base[h]).max()) for h in written]
    assert max(moved) > 1e-3  # the adapters changed the backbone
    assert "Classified" in hm("classify", "--head", "colour", "--src", str(workspace / "heads" / "colour" / "red")).output


def _stripes(path: Path, angle: float, seed: int, size: int = 32, period: int = 4) -> Path:
    """Stripes whose orientation is the class, in two random colours with a random phase."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    wave = np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period + rng.uniform(0, 2 * np.pi)) > 0
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    img = wave[..., None] * a + (~wave[..., None]) * b + rng.normal(0, 10, (size, size, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    return path


def test_finetuned_head_beats_frozen_head_on_held_out_stripes(tmp_path):
    """A backbone whose 4-d output hardly sees the orientation of fine stripes under random colours.

    Frozen, its vectors leave the head near chance; the adapters (last layer and projection) learn to
    keep the orientation, and the head trained on the new vectors is right far more often on images
    neither stage has seen. The random backbone is built from a fixed seed so that the suite's order
    cannot change it: over 11 seeds the gain was 9 to 44 points (seed 0: 62% -> 80%). PyTorch embeds
    throughout: the ONNX Runtime path gives the same vectors within 1e-4 (tests/test_onnx.py), but this
    small task's outcome moves with such differences in stage 1.
    """
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_clip(tmp_path / "clip4", projection_dim=4)
    ws = tmp_path / "ws"
    classes = {"horizontal": 0.0, "vertical": np.pi / 2}
    held: list[tuple[Path, int]] = []
    for label, (name, angle) in enumerate(classes.items()):
        for i in range(200):
            _stripes(ws / "heads" / "stripes" / name / f"{i}.png", angle, 10_000 * label + i)
        held += [(_stripes(tmp_path / "held" / name / f"{i}.png", angle, 10_000 * label + 5000 + i), label)
                 for i in range(40)]
    y = np.array([label for _, label in held])

    def held_out_accuracy(c: Context, model_name: str) -> float:
        m = c.store.model(model_name)
        vectors = vectors_for(c.store, m, embed_paths(c.store, m, [p for p, _ in held], progress=False,
                                                     backend="torch").hashes)
        head = load_head(c.workspace.checkpoint_path("stripes"))
        assert head.model_name == model_name
        return float((head.predict_labels(head.predict_proba(np.stack([vectors[p] for p, _ in held]))) == y).mean())

    with Context.open(str(ws), EmbedOptions(device="cpu", progress=False, backend="torch")) as c:
        add_model(c.store, "clip4", str(model), 4)
        config = FinetuneConfig(ft_epochs=8, blocks=1, views=2, lr=5e-3, head_lr=5e-4, batch_size=16, seed=0)
        frozen = None

        def after_stage_1(line: str) -> None:
            nonlocal frozen
            if line.startswith("Stage 1") and frozen is None:
                frozen = held_out_accuracy(c, "clip4")  # out/stripes.pt is the frozen head right now

        report = finetune(c, ["stripes"], "clip4-ft", config, say=after_stage_1)
        assert report.improved and report.activated and c.store.active_model().name == "clip4-ft"
        tuned = held_out_accuracy(c, "clip4-ft")
    assert frozen is not None and frozen < 0.7, frozen
    assert tuned >= frozen + 0.1, (frozen, tuned)


@pytest.fixture
def finetuned(ctx, timm_path, workspace):
    """A workspace with a tiny timm base and a fine-tuned model of it (registered, not necessarily active)."""
    _two_heads(workspace)
    add_model(ctx.store, "base", str(timm_path), 256)
    report = finetune(ctx, ["colour"], "tuned", FinetuneConfig(ft_epochs=1, batch_size=8), activate=True)
    return report


def test_retrained_heads_that_do_not_win_bring_the_frozen_model_and_heads_back(ctx, finetuned, workspace):
    """The joint heads may win on validation while heads retrained on the new vectors do not: the user
    keeps what the frozen model gave. The colours are easy, so both score 1.0, and a tie does not switch."""
    path = workspace / "out" / "colour.pt"
    activate_model(ctx.store, "base")
    frozen = [train_one(ctx, "colour", TrainConfig(seed=0))]
    frozen_checkpoint = read_checkpoint(path)
    activate_model(ctx.store, "tuned")
    finetuned.lp, finetuned.retrained = frozen, [train_one(ctx, "colour", TrainConfig(seed=0))]
    assert load_head(path).model_name == "tuned"
    assert frozen[0].metrics["accuracy"] == finetuned.retrained[0].metrics["accuracy"] == 1.0

    won = replace(finetuned, lp=[replace(frozen[0], metrics={**frozen[0].metrics, "accuracy": 0.75})])
    assert keep_if_retrained_heads_win(ctx, won, {"colour": frozen_checkpoint})
    assert ctx.store.active_model().name == "tuned" and won.activated and won.reverted is None

    assert not keep_if_retrained_heads_win(ctx, finetuned, {"colour": frozen_checkpoint})
    assert ctx.store.active_model().name == "base" and load_head(path).model_name == "base"
    assert not finetuned.activated and finetuned.reverted == (1.0, 1.0)
    assert ctx.store.model("tuned").path == str(finetuned.folder)  # still registered, for hm model-activate


def test_interrupt_keeps_the_best_epoch_and_does_not_activate(ctx, timm_path, workspace):
    _two_heads(workspace)
    add_model(ctx.store, "base", str(timm_path), 256)
    stop = StopRequest()
    stop.requested = True  # as if Ctrl-C came during the first step
    lines: list[str] = []
    report = finetune(ctx, ["colour", "warm"], None, FinetuneConfig(ft_epochs=3, batch_size=4), stop=stop,
                      say=lines.append)
    assert report.interrupted and report.best_epoch == 0 and not report.improved
    assert any(line.startswith("Stopped during epoch 1") for line in lines), lines
    assert not report.activated and ctx.store.active_model().name == "base"
    assert ctx.store.model("base-ft-colour-warm").path == str(workspace / "models" / "base-ft-colour-warm")
    assert load_head(workspace / "out" / "colour.pt").model_name == "base"  # the frozen heads stay in place
    record = json.loads((report.folder / RECORD_NAME).read_text())
    assert record["interrupted"] is True and record["best_epoch"] == 0


def test_finetune_refuses_bad_requests(hm, workspace, timm_path):
    _two_heads(workspace)
    hm("model-add", "--name", "base", "--path", str(timm_path), "--dim", "256")
    result = hm("finetune", "--heads", "colour,nosuch", ok=False)
    assert result.exit_code == 1 and "Error: unknown head 'nosuch'" in result.output
    result = hm("finetune", "--heads", "colour", "--name", "base", ok=False)
    assert result.exit_code == 1 and "Error: model 'base' is already registered" in result.output
    result = hm("finetune", "--heads", "colour", "--blocks", "99", ok=False)
    assert result.exit_code == 1 and "--blocks must be between 1 and" in result.output
    result = hm("finetune", "--heads", "colour", "--memory-gb", "0.000001", ok=False)
    assert result.exit_code == 1 and re.search(r"Error: the frozen blocks' activations of 20 images need [\d.]+ MiB, "
                                               r"more than --memory-gb 1e-06", result.output), result.output
    assert "Traceback" not in result.output


def test_views_shrink_to_fit_the_memory_budget():
    # 1,024 images of 256 Ki values: plain views (float32) 1 GiB; an augmented view of 512 images 0.25 GiB
    assert views_that_fit(4, 2**18, 1024, 512, 8.0) == 4
    assert views_that_fit(4, 2**18, 1024, 512, 1.5) == 2
    assert views_that_fit(4, 2**18, 1024, 512, 1.2) == 0
    assert views_that_fit(0, 2**18, 1024, 0, 1.0) == 0
    with pytest.raises(HeadmasterError, match=r"activations of 1024 images need 1\.00 GiB, more than --memory-gb 0\.9"):
        views_that_fit(4, 2**18, 1024, 512, 0.9)


def _damage_weights(folder: Path) -> None:
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


def _damage_record(folder: Path) -> None:
    (folder / RECORD_NAME).write_text("{not json")


def _drop_weights(folder: Path) -> None:
    (folder / WEIGHTS_NAME).unlink()


def _foreign_base(folder: Path) -> None:
    record = json.loads((folder / RECORD_NAME).read_text())
    record["base"]["path"] = str(folder.parent / "no-such-base")
    (folder / RECORD_NAME).write_text(json.dumps(record))


@pytest.mark.parametrize("damage, message", [
    (_damage_weights, r"adapter folder .* is damaged: cannot read adapter\.safetensors"),
    (_damage_record, r"adapter folder .* is damaged: headmaster-adapter\.json is unreadable"),
    (_drop_weights, r"adapter folder .* is damaged: adapter\.safetensors is missing"),
    (_foreign_base, r"model 'tuned' adapts base model 'base' .* which cannot be loaded: .*folder not found"),
    (lambda folder: shutil.rmtree(folder), r"model 'tuned': folder not found"),
])
def test_damaged_or_missing_adapter_folder_is_one_clear_error(finetuned, hm, workspace, damage, message):
    assert load_embedder("tuned", str(finetuned.folder), 256, "cpu").dim == 256  # intact: loads
    damage(finetuned.folder)
    with pytest.raises(HeadmasterError, match=message):
        load_embedder("tuned", str(finetuned.folder), 256, "cpu")
    fill_bucket(workspace / "heads" / "colour" / "red", "red", 2, 900)
    result = hm("embed", ok=False)  # the new images need the model: one error line, no traceback
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and lines[-1].startswith("Error: ") and "Traceback" not in result.output
    assert re.search(message, lines[-1]), lines[-1]


def test_hmd_sorts_with_the_fine_tuned_model(tmp_path, clip_path):
    """The adapted model is just another registered model: the daemon's worker loads it (base plus merged
    adapters) and sorts an inbox image with the head that was retrained on its vectors."""
    from test_daemon import Hmd, wait_for

    ws = tmp_path / "workspace"
    fill_bucket(ws / "heads" / "colour" / "red", "red", 10, 0)
    fill_bucket(ws / "heads" / "colour" / "blue", "blue", 10, 100)
    with Context.open(str(ws), EmbedOptions(device="cpu", progress=False)) as c:
        add_model(c.store, "base", str(clip_path), 24)
        finetune(c, ["colour"], "tuned", FinetuneConfig(ft_epochs=1, batch_size=8), activate=True)
    daemon = Hmd(tmp_path, ws).start()
    try:
        status = daemon.status()
        assert status["model"] == "tuned" and daemon.head()["model"] == "tuned" and daemon.head()["trained"]
        sample = colour_image(tmp_path / "new_blue.png", "blue", 4242)
        shutil.copy(sample, ws / "inbox" / "colour" / "new_blue.png")
        sorted_to = ws / "classified" / "colour" / "blue" / "new_blue.png"
        wait_for(sorted_to.exists, 120, "the inbox image to be sorted with the fine-tuned model", daemon)
        assert sorted_to.read_bytes() == sample.read_bytes() and daemon.head()["model"] == "tuned"
    finally:
        daemon.kill()
