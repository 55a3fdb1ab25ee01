import os
import time

from helpers import fill_bucket

from headmaster.embedding import embed_paths


def test_second_embed_reads_no_unchanged_file(clip_ctx, tmp_path):
    paths = fill_bucket(tmp_path / "imgs", "red", 6)
    model = clip_ctx.store.active_model()
    first = embed_paths(clip_ctx.store, model, paths, device="cpu", progress=False)
    assert first.embedded == 6 and first.hashed == 6
    again = embed_paths(clip_ctx.store, model, paths, device="cpu", progress=False)
    assert again.hashed == 0 and again.embedded == 0 and again.cached == 6
    assert clip_ctx.store.embedding_count(model.id) == 6
    # a changed file is read again (new content -> new vector); the others are not
    fill_bucket(tmp_path / "imgs", "blue", 1, start_seed=0)  # writes blue_000.png, a new file
    os.utime(paths[0], ns=(time.time_ns(), time.time_ns() + 10**9))
    third = embed_paths(clip_ctx.store, model, [*paths, tmp_path / "imgs" / "blue_000.png"], device="cpu",
                        progress=False)
    assert third.hashed == 2 and third.embedded == 1 and third.cached == 6
