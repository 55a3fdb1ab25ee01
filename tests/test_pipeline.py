"""The embedding pipeline: exact preprocessing with reduced-size decoding, no re-reading, bounded memory."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from headmaster.embedding import EmbedResult, add_model, embed_paths, get_embedder, load_image, ordered_map, vectors_for
from headmaster.embedding.cores import SPLIT, TURNS, CoreShare
from headmaster.store import Store

TINY_VISION_224 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=224, patch_size=32)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                 bos_token_id=0, eos_token_id=1, pad_token_id=1)


def photo(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A photo-like JPEG: gradients, a few edges and noise (smooth colours alone would hide resize errors)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    img = 40 + 150 * x * rng.uniform(0.3, 1, 3) + 60 * y * rng.uniform(0.3, 1, 3)
    img = img + 40 * ((np.sin(x * rng.uniform(10, 40)) > 0) ^ (np.cos(y * rng.uniform(10, 40)) > 0))
    img = img + rng.normal(0, 8, (h, w, 3)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


@pytest.fixture(scope="session")
def clip224_path(models_dir) -> Path:
    """A tiny CLIP that takes 224x224 input, with CLIP's real preprocessing settings."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = models_dir / "tiny-clip-224"
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(vision_config=TINY_VISION_224, text_config=TINY_TEXT, projection_dim=16)) \
        .save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3) \
        .save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def large_photos(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("photos")
    # 2400x1800 decodes at 1/4 scale (600x450), 1200x1600 portrait at 1/4 (300x400), 1000x700 at 1/2
    return [photo(folder / "a.jpg", (2400, 1800), 1), photo(folder / "b.jpg", (1200, 1600), 2),
            photo(folder / "c.jpg", (1000, 700), 3)]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_reduced_decoding_matches_the_processor_alone(tmp_path, clip224_path, large_photos):
    with Store(tmp_path / "db") as store:
        model = add_model(store, "c224", str(clip224_path), 16)
        result = embed_paths(store, model, large_photos, device="cpu", progress=False)
        assert result.embedded == 3 and not result.skipped
        ours = vectors_for(store, model, result.hashes)
    embedder = get_embedder("c224", str(clip224_path), 16, "cpu")
    for p in large_photos:
        with Image.open(p) as img:
            full = img.convert("RGB")  # full-size decode, then the processor alone
        assert load_image(p, min_side=224).size < full.size  # the pipeline really decoded smaller
        reference_pixels = embedder.preprocess([full])
        pipeline_pixels = embedder.preprocess([load_image(p, min_side=224)])
        # normalised pixel values (std units): small per-pixel differences from the DCT-domain downscale
        assert np.abs(reference_pixels - pipeline_pixels).mean() < 0.05
        reference = embedder.embed_pixels(reference_pixels)[0]
        assert cosine(ours[p], reference) > 0.99, p.name


def test_reduced_decoding_keeps_at_least_the_input_side(large_photos):
    for p in large_photos:
        img = load_image(p, min_side=224)
        assert min(img.size) >= 224
        assert min(img.size) < 2 * 224 or min(Image.open(p).size) < 2 * 224  # and no larger than needed


def test_second_embed_reads_no_unchanged_file(tmp_path, clip_path):
    from helpers import fill_bucket

    files = fill_bucket(tmp_path / "imgs", "red", 6) + fill_bucket(tmp_path / "imgs", "blue", 4, 100)
    with Store(tmp_path / "db") as store:
        model = add_model(store, "tiny", str(clip_path), 24)
        first = embed_paths(store, model, files, device="cpu", progress=False)
        assert (first.embedded, first.cached, first.hashed) == (10, 0, 10)
        rows = store.embedding_count(model.id)
        second = embed_paths(store, model, files, device="cpu", progress=False)
        assert (second.embedded, second.cached, second.hashed) == (0, 10, 0)
        assert second.hashes == first.hashes and second.load_seconds == 0.0
        assert store.embedding_count(model.id) == rows
        # touching one file makes exactly that one file read again (same content: no new vector)
        os.utime(files[0], ns=(time.time_ns(), time.time_ns() + 10**9))
        third = embed_paths(store, model, files, device="cpu", progress=False)
        assert (third.hashed, third.embedded, third.cached) == (1, 0, 10)


def test_duplicates_are_embedded_once_and_bad_files_skipped(tmp_path, clip_path):
    from helpers import colour_image

    a = colour_image(tmp_path / "a.png", "red", 1)
    b = tmp_path / "b.png"
    b.write_bytes(a.read_bytes())
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    c = colour_image(tmp_path / "c.png", "blue", 2)
    with Store(tmp_path / "db") as store:
        model = add_model(store, "tiny", str(clip_path), 24)
        result = embed_paths(store, model, [a, b, broken, c], device="cpu", progress=False, batch_size=1)
    assert result.embedded == 2  # a and b share their content
    assert result.hashes[a] == result.hashes[b] and set(result.hashes) == {a, b, c}
    assert [s.path for s in result.skipped] == [broken]
    summary = result.summary("tiny")
    assert "Embedded 2 images with tiny (0 cached, 1 skipped)" in summary
    assert "img/s" in summary


def test_unusable_contents_are_remembered_so_a_rerun_needs_no_model(tmp_path, clip_path, monkeypatch):
    import dataclasses

    from helpers import colour_image

    import headmaster.embedding.pipeline as pipeline
    from headmaster import HeadmasterError

    good = colour_image(tmp_path / "good.png", "red", 1)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with Store(tmp_path / "db") as store:
        model = add_model(store, "tiny", str(clip_path), 24)
        first = embed_paths(store, model, [good, broken], device="cpu", progress=False)
        assert first.embedded == 1 and [s.path for s in first.skipped] == [broken]
        # the same model id, but a folder that cannot load: any attempt to load it raises
        unloadable = dataclasses.replace(model, path=str(tmp_path / "gone"))
        again = tmp_path / "again.jpg"  # the same bad content under a new name: hashed now, still skipped
        again.write_bytes(broken.read_bytes())
        second = embed_paths(store, unloadable, [good, broken, again], device="cpu", progress=False)
        assert (second.embedded, second.cached) == (0, 1)
        assert {s.path: s.reason for s in second.skipped} == {broken: first.skipped[0].reason,
                                                               again: first.skipped[0].reason}
        # another model has not tried it; another Pillow may decode it: both try again
        other = store.add_model("other", str(tmp_path / "gone"), 24)
        with pytest.raises(HeadmasterError):
            embed_paths(store, other, [broken], device="cpu", progress=False)
        monkeypatch.setattr(pipeline, "DECODER_VERSION", "0.0-test")
        with pytest.raises(HeadmasterError):
            embed_paths(store, unloadable, [broken], device="cpu", progress=False)


def test_a_file_that_cannot_be_read_now_is_not_called_unusable(tmp_path):
    from headmaster.embedding import ImageError
    from headmaster.embedding.images import ImageUnavailable

    with pytest.raises(ImageUnavailable, match="file vanished"):
        load_image(tmp_path / "missing.jpg")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty file") as info:
        load_image(empty)
    assert not isinstance(info.value, ImageUnavailable)  # this one is about the content: remembered


def test_progress_bar_shows_rate_and_time_left(tmp_path, clip_path, capsys):
    from helpers import fill_bucket

    files = fill_bucket(tmp_path / "imgs", "green", 5)
    with Store(tmp_path / "db") as store:
        model = add_model(store, "tiny", str(clip_path), 24)
        embed_paths(store, model, files, device="cpu", progress=True, batch_size=2, label="Embedding")
    err = capsys.readouterr().err
    assert "Embedding" in err and "img/s" in err and "5/5" in err and "<" in err  # tqdm: elapsed<remaining


def test_ordered_map_keeps_order_and_at_most_depth_in_flight():
    lock = threading.Lock()
    state = {"running": 0, "max_running": 0, "pulled": 0, "max_ahead": 0}
    handed_out = []

    def items():
        for i in range(40):
            with lock:
                state["pulled"] += 1
                state["max_ahead"] = max(state["max_ahead"], state["pulled"] - len(handed_out))
            yield i

    def work(i: int) -> int:
        with lock:
            state["running"] += 1
            state["max_running"] = max(state["max_running"], state["running"])
        time.sleep(0.002 * (i % 3))
        with lock:
            state["running"] -= 1
        return i * i

    for item, value in ordered_map(work, items(), workers=3, depth=5):
        handed_out.append(item)
        assert value == item * item
    assert handed_out == list(range(40))
    assert state["max_ahead"] <= 5  # never more than `depth` items taken from the source and not yet handed out
    assert state["max_running"] <= 3


def test_embed_result_keeps_its_fields():
    r = EmbedResult()
    assert (r.embedded, r.cached, r.skipped, r.hashed, r.seconds, r.embed_seconds, r.hashes) == (0, 0, [], 0, 0, 0, {})
    r.embedded, r.embed_seconds = 10, 2.0
    assert r.images_per_second == 5.0
    assert set(r.timings()) >= {"embedded", "cached", "skipped", "hashed", "embed_seconds", "load_seconds"}


# -- sharing the CPU between the forward pass and the file workers ----------------------------------

def _watch_workers(share: CoreShare, forward_batches: int, sleep_in_forward) -> int:
    """Run 3 busy workers beside `forward_batches` forward passes; return the most workers seen inside one."""
    stop = threading.Event()
    lock = threading.Lock()
    seen = {"active": 0, "max_during_forward": 0, "in_forward": False}

    def worker():
        while not stop.is_set():
            with share.working():
                with lock:
                    seen["active"] += 1
                    if seen["in_forward"]:
                        seen["max_during_forward"] = max(seen["max_during_forward"], seen["active"])
                time.sleep(0.001)
                with lock:
                    seen["active"] -= 1

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(forward_batches):
            with share.forward(4):
                with lock:
                    seen["in_forward"] = True
                    seen["max_during_forward"] = max(seen["max_during_forward"], seen["active"])
                time.sleep(sleep_in_forward(share.mode))
                with lock:
                    seen["in_forward"] = False
            time.sleep(0.003)
    finally:
        stop.set()
        for t in threads:
            t.join()
        share.close()
    return seen["max_during_forward"]


def test_turns_keeps_workers_out_of_the_forward_pass():
    before = torch.get_num_threads()
    share = CoreShare(True, cores=2, mode=TURNS)
    assert _watch_workers(share, 4, lambda mode: 0.01) == 0
    assert torch.get_num_threads() == before  # thread count given back


def test_split_lets_one_worker_run_beside_the_forward_pass():
    share = CoreShare(True, cores=2, mode=SPLIT)
    assert _watch_workers(share, 4, lambda mode: 0.01) <= 1


def test_auto_keeps_the_faster_way_of_sharing():
    share = CoreShare(True, cores=2)
    _watch_workers(share, 8, lambda mode: 0.03 if mode == SPLIT else 0.005)
    assert share.chosen == TURNS
    assert {m for m, _ in share.history} == {TURNS, SPLIT}
    share = CoreShare(True, cores=2)
    _watch_workers(share, 8, lambda mode: 0.03 if mode == TURNS else 0.005)
    assert share.chosen == SPLIT


def test_disabled_share_overlaps_freely():
    share = CoreShare(False, cores=2)
    assert _watch_workers(share, 3, lambda mode: 0.02) >= 1


def test_a_model_that_fails_to_load_leaves_no_threads_and_keeps_the_hashes(tmp_path):
    from helpers import fill_bucket

    from headmaster import HeadmasterError

    files = fill_bucket(tmp_path / "imgs", "red", 3)
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    threads_before = threading.active_count()
    with Store(tmp_path / "db") as store:
        model = store.add_model("broken", str(not_a_model), 8)  # registered, then its folder broke
        with pytest.raises(HeadmasterError):
            embed_paths(store, model, files, device="cpu", progress=False)
        assert threading.active_count() == threads_before
        assert len(store.file_signatures(str(f) for f in files)) >= 1  # what was hashed and used is kept


def test_default_workers_use_every_core_only_beside_a_gpu(monkeypatch):
    import headmaster.embedding.pipeline as pipeline

    monkeypatch.setattr(pipeline, "cpu_cores", lambda: 16)
    assert pipeline.default_workers("cpu") == 8  # the CPU forward pass needs the cores too
    assert pipeline.default_workers("cuda") == 16 and pipeline.default_workers("mps") == 16
    monkeypatch.setattr(pipeline, "cpu_cores", lambda: 1)
    assert pipeline.default_workers("cpu") == 1 and pipeline.default_workers("cuda") == 1
