import numpy as np
import pytest
from PIL import Image

from headmaster import HeadmasterError
from headmaster.embedding import load_embedder
from headmaster.embedding.embedders import pick_device


@pytest.mark.parametrize("fixture, rule, dim", [
    ("clip_path", "get_image_features", 24),
    ("siglip_path", "get_image_features", 32),
    ("dinov2_path", "pooler_output", 32),
    ("timm_path", "pooler_output", 256),
])
def test_each_architecture_loads_and_embeds(request, fixture, rule, dim):
    path = request.getfixturevalue(fixture)
    emb = load_embedder("m", str(path), dim, "cpu")
    assert emb.rule.name == rule and emb.dim == dim
    pixels = emb.preprocess([Image.new("RGB", (50, 40), (200, 10, 10)), Image.new("RGB", (30, 60), (10, 10, 200))])
    vectors = emb.embed_pixels(pixels)
    assert vectors.shape == (2, dim) and vectors.dtype == np.float32
    assert not np.array_equal(vectors[0], vectors[1])  # different images, different vectors


def test_dim_mismatch_is_clear(clip_path):
    with pytest.raises(HeadmasterError, match="produces 24-dimensional vectors but was registered with --dim 512"):
        load_embedder("clip", str(clip_path), 512, "cpu")


def test_missing_folder_and_unreachable_hub(tmp_path):
    with pytest.raises(HeadmasterError, match="folder not found"):
        load_embedder("x", str(tmp_path / "nope"), 8, "cpu")
    with pytest.raises(HeadmasterError, match="cannot load model 'y' from 'nobody/no-such-model'.*HF_HUB_OFFLINE"):
        load_embedder("y", "nobody/no-such-model", 8, "cpu")


def test_device_override_and_errors():
    assert pick_device("cpu").type == "cpu"
    with pytest.raises(HeadmasterError, match="unknown device"):
        pick_device("toaster")


@pytest.mark.parametrize("fixture, layout", [("timm_path", "channels_last"), ("clip_path", "contiguous_format")])
def test_cnns_run_channels_last_on_the_cpu_with_the_same_vectors(request, fixture, layout):
    import torch

    e = load_embedder("m", str(request.getfixturevalue(fixture)), device="cpu")
    assert e.memory_format == getattr(torch, layout)
    pixels = np.random.default_rng(0).normal(size=(3, 3, 32, 32))
    fast = e.embed_pixels(pixels.astype(np.float32))
    e.model.to(memory_format=torch.contiguous_format)
    e.memory_format = torch.contiguous_format
    np.testing.assert_allclose(fast, e.embed_pixels(pixels.astype(np.float32)), rtol=1e-4, atol=1e-5)
