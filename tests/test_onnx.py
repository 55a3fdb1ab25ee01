"""ONNX: the exported classifier, the ONNX Runtime embedding backend and the torch-free classify path."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import build_clip, build_dinov2, build_timm, colour_image, fill_bucket, run_hm

from headmaster import HeadmasterError
from headmaster.config import config_from_dict
from headmaster.embedding import activate_model, add_model, embed_paths, spec_from_processor, vectors_for
from headmaster.embedding.backends import backend_embedder, uses_onnx
from headmaster.embedding.onnx.backbone import find_export
from headmaster.heads import (TrainConfig, head_from_checkpoint, predict_heads, save_checkpoint, source_images,
                              train_head, train_one, train_prototypes)
from headmaster.heads.arrays import ArrayHead
from headmaster.heads.sorting import load_array_head

REPO = Path(__file__).resolve().parents[1]
# Imports of these fail in the child: proves a code path never needs them
BLOCK = "import sys\nfor _m in {mods}: sys.modules[_m] = None\n"


def blocked_python(code: str, mods: tuple[str, ...] = ("torch", "transformers")) -> list[str]:
    return [sys.executable, "-c", BLOCK.format(mods=repr(list(mods))) + code]


def build_dinov2_registers(folder: Path) -> Path:
    """DINOv2 with registers run at a smaller size than its position table: its antialiased bicubic
    resize of the position embeddings (aten::_upsample_bicubic2d_aa) has no ONNX export."""
    from transformers import BitImageProcessor, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                       num_attention_heads=2, image_size=64, patch_size=8)) \
        .save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


# -- preprocessing and heads without torch ----------------------------------------------------------------

@pytest.mark.parametrize("family", ["clip", "dinov2", "timm", "siglip"])
def test_numpy_preprocessing_equals_the_processor(family, request):
    """The ONNX path's Pillow/numpy preprocessing gives the processor's own arrays, for odd sizes too."""
    from transformers import AutoImageProcessor

    path = request.getfixturevalue(f"{family}_path")
    processor = AutoImageProcessor.from_pretrained(path, backend="pil")  # what load_embedder uses
    spec = spec_from_processor(processor)
    rng = np.random.default_rng(0)
    for h, w in [(40, 48), (33, 100), (100, 33), (31, 31), (20, 50), (301, 299)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        expected = processor(images=[image], return_tensors="pt")["pixel_values"].float().numpy()
        ours = spec.apply([image])
        assert ours.shape == expected.shape
        assert np.abs(ours - expected).max() < 1e-5, (family, h, w)


def _vectors(n: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = rng.normal(0, 1, (classes, dim))
    return (centres[labels] + rng.normal(0, 0.8, (n, dim))).astype(np.float32) * 7, labels


@pytest.mark.parametrize("kind,classes", [("mlp", 2), ("mlp", 3), ("prototype", 2), ("prototype", 3)])
def test_array_head_scores_like_the_torch_head(kind, classes, tmp_path):
    x, y = _vectors(60, 16, classes)
    names = [f"c{i}" for i in range(classes)]
    train = train_head if kind == "mlp" else train_prototypes
    checkpoint = train("h", names, x, y, {}, "m", TrainConfig(epochs=5)).checkpoint
    path = tmp_path / "h.pt"
    save_checkpoint(checkpoint, path)
    arrays = load_array_head(path)
    torch_head = head_from_checkpoint(checkpoint)
    probe, _ = _vectors(40, 16, classes, seed=1)
    ours, theirs = arrays.predict_proba(probe), torch_head.predict_proba(probe)
    assert isinstance(arrays, ArrayHead) and arrays.kind == kind
    assert np.abs(ours - theirs).max() < 1e-5
    assert [b for b, _ in arrays.decide(ours)] == [b for b, _ in torch_head.decide(theirs)]


def test_array_head_reads_its_cache_without_torch(tmp_path):
    x, y = _vectors(40, 8, 2)
    path = tmp_path / "h.pt"
    save_checkpoint(train_head("h", ["a", "b"], x, y, {}, "m", TrainConfig(epochs=3)).checkpoint, path)
    expected = load_array_head(path).predict_proba(x[:5])
    code = (f"import numpy as np\nfrom headmaster.heads.sorting import load_array_head\n"
            f"print(load_array_head({str(path)!r}).predict_proba(np.load({str(tmp_path / 'x.npy')!r})).tolist())")
    np.save(tmp_path / "x.npy", x[:5])
    out = subprocess.run(blocked_python(code), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert np.abs(np.array(json.loads(out.stdout)) - expected).max() < 1e-7


# -- choosing the backend ---------------------------------------------------------------------------------

def test_backend_choice():
    assert uses_onnx("onnxruntime", "cpu") and uses_onnx("auto", "cpu") and not uses_onnx("torch", "cpu")
    assert uses_onnx("onnxruntime", None)  # asked for by name: the CPU even if a GPU is present
    with pytest.raises(HeadmasterError, match="CPU only"):
        uses_onnx("onnxruntime", "cuda")
    with pytest.raises(HeadmasterError, match="unknown embedding backend"):
        uses_onnx("tensorrt", "cpu")
    assert config_from_dict({"embedding": {"backend": "torch"}}).embedding.backend == "torch"
    with pytest.raises(HeadmasterError, match="embedding.backend"):
        config_from_dict({"embedding": {"backend": "fast"}})


def test_backends_give_the_same_vectors_and_share_the_cache(ctx, dinov2_path, tmp_path):
    model = add_model(ctx.store, "tiny-dinov2", str(dinov2_path), 32)
    images = fill_bucket(tmp_path / "imgs", "green", 6) + [colour_image(tmp_path / "imgs" / "big.jpg", "red", 9,
                                                                        size=(300, 200))]
    first = embed_paths(ctx.store, model, images, device="cpu", backend="onnxruntime", progress=False)
    assert first.backend == "onnxruntime" and first.embedded == len(images)
    again = embed_paths(ctx.store, model, images, device="cpu", backend="torch", progress=False)
    assert again.embedded == 0 and again.cached == len(images)
    stored = vectors_for(ctx.store, model, first.hashes)
    from headmaster.embedding import get_embedder, load_image

    torch_embedder = get_embedder(model.name, model.path, model.embed_dim, "cpu")
    pixels = torch_embedder.preprocess([load_image(p, min_side=torch_embedder.input_side) for p in images])
    reference = torch_embedder.embed_pixels(pixels)
    ours = np.stack([stored[p] for p in images])
    assert np.abs(ours - reference).max() < 1e-4


def test_unexportable_model_falls_back_to_torch_with_one_line(ctx, models_dir, tmp_path, caplog):
    path = build_dinov2_registers(models_dir / "tiny-dinov2-registers")
    model = add_model(ctx.store, "tiny-registers", str(path), 32)
    images = fill_bucket(tmp_path / "imgs", "blue", 3)
    with caplog.at_level(logging.WARNING, logger="headmaster.onnx"):
        result = embed_paths(ctx.store, model, images, device="cpu", backend="auto", progress=False)
        assert backend_embedder(model, "auto", "cpu").__class__.__name__ == "Embedder"  # asked again: no new line
    assert result.backend == "torch" and result.embedded == 3
    lines = [r.getMessage() for r in caplog.records if r.name == "headmaster.onnx"]
    assert len(lines) == 1 and "aten::_upsample_bicubic2d_aa" in lines[0] and "PyTorch" in lines[0]
    assert find_export(model).ok is False  # recorded: not tried again until the model's files change
    with pytest.raises(HeadmasterError, match="aten::_upsample_bicubic2d_aa"):
        backend_embedder(model, "onnxruntime", "cpu")
    # the classifier export names the operation too
    fill_bucket(ctx.workspace.heads_dir / "colour" / "red", "red", 4)
    fill_bucket(ctx.workspace.heads_dir / "colour" / "blue", "blue", 4, 50)
    train_one(ctx, "colour", TrainConfig(epochs=2))
    from headmaster.heads.export import export_onnx

    with pytest.raises(HeadmasterError, match="cannot export model 'tiny-registers'.*aten::_upsample_bicubic2d_aa"):
        export_onnx(ctx, tmp_path / "export")


# -- the exported classifier ------------------------------------------------------------------------------

def _two_heads(ws: Path) -> Path:
    """heads/colour (binary: blue, red) and heads/hue (blue, green, red); a src/ folder to classify."""
    for colour, seed in (("red", 0), ("blue", 100)):
        fill_bucket(ws / "heads" / "colour" / colour, colour, 8, seed)
    for colour, seed in (("red", 200), ("blue", 300), ("green", 400)):
        fill_bucket(ws / "heads" / "hue" / colour, colour, 8, seed)
    src = ws.parent / "src"
    for colour, seed in (("red", 500), ("blue", 600), ("green", 700), ("yellow", 800)):
        fill_bucket(src, colour, 2, seed)
    colour_image(src / "photo.jpg", "red", 900, size=(120, 90))
    return src


@pytest.mark.parametrize("family,dim", [("clip", 24), ("dinov2", 32), ("timm", None)])
def test_export_matches_classify(family, dim, ctx, request, tmp_path):
    """A binary and a multi-class head in one file; onnxruntime gives hm classify's probabilities."""
    import onnxruntime as ort

    from headmaster.embedding import PreprocessSpec
    from headmaster.heads.export import export_onnx

    path = request.getfixturevalue(f"{family}_path")
    if dim is None:
        from headmaster.embedding import load_embedder

        dim = load_embedder("probe", str(path), device="cpu").dim
    add_model(ctx.store, f"tiny-{family}", str(path), dim)
    src = _two_heads(ctx.workspace.root)
    for head in ("colour", "hue"):
        train_one(ctx, head, TrainConfig(epochs=20))
    report = export_onnx(ctx, tmp_path / "export", check=True)
    assert report.heads == ["colour", "hue"] and all(c.max_diff < 1e-3 for c in report.checks)
    meta = json.loads(report.json_path.read_text())
    assert meta["heads"]["colour"]["type"] == "binary" and meta["heads"]["hue"]["classes"] == ["blue", "green", "red"]
    assert meta["heads"]["hue"]["uncertain"] == {"rule": "min_confidence", "min_confidence": 0.5}
    spec = PreprocessSpec.from_json(meta["preprocess"])
    from headmaster.embedding import load_image

    paths = source_images(src)
    session = ort.InferenceSession(str(report.onnx_path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"pixel_values": spec.apply([load_image(p, min_side=spec.input_side) for p in paths])})
    expected = predict_heads(ctx, ["colour", "hue"], paths)
    for index, head in enumerate(["colour", "hue"]):
        classes = meta["heads"][head]["classes"]
        ours = np.array([[pred.decisions[head].probabilities[c] for c in classes] for pred in expected.predictions])
        assert np.abs(outputs[index] - ours).max() < 1e-4


def test_export_errors(ctx, clip_path, dinov2_path, tmp_path):
    from headmaster.heads.export import export_onnx

    add_model(ctx.store, "tiny-clip", str(clip_path), 24)
    _two_heads(ctx.workspace.root)
    with pytest.raises(HeadmasterError, match="head 'colour' is not trained"):
        export_onnx(ctx, tmp_path / "e", ["colour"])
    train_one(ctx, "colour", TrainConfig(epochs=2))
    add_model(ctx.store, "tiny-dinov2", str(dinov2_path), 32)
    activate_model(ctx.store, "tiny-dinov2")
    with pytest.raises(HeadmasterError, match="trained with model 'tiny-clip' but the active model is 'tiny-dinov2'"):
        export_onnx(ctx, tmp_path / "e", ["colour"])
    with pytest.raises(HeadmasterError, match="no heads trained with the active model 'tiny-dinov2'"):
        export_onnx(ctx, tmp_path / "e")


# -- the command line: export, the standalone example, and classify without torch ----------------------------

def _rows(text: str) -> dict[str, dict[str, str]]:
    return {r["image"]: r for r in csv.DictReader(io.StringIO(text))}


def test_cli_export_example_and_torch_free_classify(clip_ctx, tmp_path):
    ws = clip_ctx.workspace.root
    src = _two_heads(ws)
    for head in ("colour", "hue"):
        train_one(clip_ctx, head, TrainConfig(epochs=20))
    export = tmp_path / "export"
    r = run_hm(["export", "--dest", str(export), "--format", "onnx", "--heads", "colour,hue", "--check"], ws)
    assert r.returncode == 0, r.stderr
    assert "Checked colour" in r.stdout and "Checked hue" in r.stdout and (export / "classifier.onnx").is_file()
    r = run_hm(["export", "--dest", str(export), "--check"], ws)
    assert r.returncode == 1 and "--format onnx" in r.stderr

    # with the backbone's export cached, hm classify and hm embed never import torch or transformers
    model = clip_ctx.store.active_model()
    assert backend_embedder(model, "onnxruntime", "cpu").backend == "onnxruntime"  # exports into the cache
    expected = predict_heads(clip_ctx, ["colour", "hue"], source_images(src))
    hm_env = dict(os.environ, HEADMASTER_WORKSPACE=str(ws), HF_HUB_OFFLINE="1")
    classify = ["classify", "--heads", "colour,hue", "--src", str(src), "--format", "csv", "--backend", "onnxruntime"]
    code = f"from headmaster.cli import cli\ncli({classify!r}, prog_name='hm')"
    classified = subprocess.run(blocked_python(code), capture_output=True, text=True, env=hm_env, timeout=120)
    assert classified.returncode == 0, classified.stderr
    theirs = _rows(classified.stdout)
    for pred in expected.predictions:
        assert theirs[pred.path.name]["hue_prediction"] == pred.decisions["hue"].bucket
    fill_bucket(ws / "heads" / "colour" / "red", "red", 2, 950)
    code = "from headmaster.cli import cli\ncli(['embed', '--backend', 'onnxruntime'], prog_name='hm')"
    embedded = subprocess.run(blocked_python(code), capture_output=True, text=True, env=hm_env, timeout=120)
    assert embedded.returncode == 0 and "Embedded 2 images" in embedded.stdout, embedded.stderr

    # the standalone example, with torch, transformers and headmaster all unimportable, decides the same
    script = REPO / "examples" / "onnx_predict.py"
    code = f"import runpy\nsys.argv = ['onnx_predict.py', {str(export)!r}, {str(src)!r}]\n" \
           f"runpy.run_path({str(script)!r}, run_name='__main__')"
    out = subprocess.run(blocked_python(code, ("torch", "transformers", "headmaster")), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ours = _rows(out.stdout)
    assert set(ours) == set(theirs) and len(ours) == 9
    for image, row in theirs.items():
        for column, value in row.items():
            if column.endswith("prediction") or column == "image":
                assert ours[image][column] == value, (image, column)
            else:
                assert abs(float(ours[image][column]) - float(value)) <= 1.5e-4, (image, column)


def test_config_backend_and_the_option_override_it(clip_ctx, monkeypatch):
    from click.testing import CliRunner

    from headmaster.cli import cli

    ws = clip_ctx.workspace.root
    fill_bucket(ws / "heads" / "colour" / "red", "red", 3)
    fill_bucket(ws / "heads" / "colour" / "blue", "blue", 3, 50)
    (ws / "config.toml").write_text('[embedding]\nbackend = "torch"\n')
    monkeypatch.setenv("HEADMASTER_TIMINGS", "1")
    monkeypatch.delenv("HEADMASTER_CONFIG", raising=False)

    def embed(*args: str) -> dict:
        r = CliRunner().invoke(cli, ["--workspace", str(ws), "--no-progress", "embed", *args])
        assert r.exit_code == 0, r.output
        return json.loads(next(l for l in r.stderr.splitlines() if l.startswith("timings "))[8:])

    assert embed()["backend"] == "torch"  # from config.toml
    fill_bucket(ws / "heads" / "colour" / "red", "red", 2, 80)
    assert embed("--backend", "onnxruntime")["backend"] == "onnxruntime"
    (ws / "config.toml").write_text('[embedding]\nbackend = "fastest"\n')
    r = CliRunner().invoke(cli, ["--workspace", str(ws), "embed"])
    assert r.exit_code == 1 and "'embedding.backend' must be one of auto, torch, onnxruntime" in r.output
