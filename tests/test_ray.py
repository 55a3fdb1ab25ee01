"""The Ray engine (hm embed/classify --engine ray) on a local Ray instance: one start for the whole module."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import signal
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import colour_image, fill_bucket

from headmaster import HeadmasterError
from headmaster.cli import cli
from headmaster.embedding import (Context, EmbedOptions, RayOptions, add_model, check_readable_on_workers, embed_paths,
                                  embed_paths_ray, require_ray)
from headmaster.store import Store


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance for this module: 2 CPUs, no dashboard, nothing reachable from outside."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2, logging_level="ERROR",
             configure_logging=True)
    yield ray
    ray.shutdown()


def invoke(workspace: Path, *args, ok: bool = True):
    result = CliRunner().invoke(cli, ["--workspace", str(workspace), *args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def one_error_line(result, pattern: str) -> None:
    assert result.exit_code == 1
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert re.search(pattern, lines[0]), lines[0]


def colour_workspace(root: Path, clip_path: Path, n: int = 10, bad: bool = False) -> Path:
    ws = root / "workspace"
    fill_bucket(ws / "heads" / "colour" / "red", "red", n, 0)
    fill_bucket(ws / "heads" / "colour" / "blue", "blue", n, 100)
    if bad:
        red = ws / "heads" / "colour" / "red"
        (red / "empty.jpg").write_bytes(b"")
        (red / "text.png").write_text("not an image")
        good = colour_image(red / "full.jpg", "red", 999, size=(64, 64), fmt="JPEG").read_bytes()
        (red / "cut.jpg").write_bytes(good[: len(good) // 2])
    with Store(ws / "headmaster.db") as store:
        add_model(store, "tiny-clip", str(clip_path), 24)
    return ws


def cache_of(ws: Path) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    """(hash -> vector, path -> hash, hash -> unusable reason) of a workspace's database."""
    con = sqlite3.connect(ws / "headmaster.db")
    vectors = {h: np.frombuffer(v, "<f4") for h, v in con.execute("SELECT hash, vector FROM embeddings")}
    files = dict(con.execute("SELECT path, hash FROM files"))
    bad = dict(con.execute("SELECT hash, reason FROM unusable"))
    con.close()
    return vectors, files, bad


# -- without a Ray start (first: the module's Ray instance starts with the first test that needs it) --------

def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path, clip_path):
    ws = colour_workspace(tmp_path, clip_path)
    with Context.open(str(ws), EmbedOptions(device="cpu", progress=False)) as c:
        paths = sorted((ws / "heads" / "colour" / "red").glob("*.png"))
        embed_paths(c.store, c.active_model(), paths[:4])  # 4 cached, 16 to go
    out = invoke(ws, "embed", "--engine", "ray", "--dry-run", "--workers", "3", "--gpus-per-worker", "0.5").output
    assert "Plan (dry run, nothing started): 20 files" in out
    assert re.search(r"cached:\s+4\n", out) and re.search(r"to embed:\s+16 \(16 new or changed", out)
    assert "3 embedding actors, each 0.5 GPU" in out
    import ray

    assert not ray.is_initialized()


def test_ray_flags_need_the_ray_engine_and_a_missing_ray_is_one_line(tmp_path, clip_path, monkeypatch):
    ws = colour_workspace(tmp_path, clip_path)
    one_error_line(invoke(ws, "embed", "--address", "auto", ok=False), r"--address only apply to --engine ray")
    one_error_line(invoke(ws, "embed", "--engine", "ray", "--device", "cpu", ok=False), r"--gpus-per-worker")
    one_error_line(invoke(ws, "embed", "--engine", "ray", "--address", "ray://head:10001", ok=False),
                   r"Ray Data does not run over Ray Client")
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # as on a plain install: `import ray` fails
    with pytest.raises(HeadmasterError, match=r"pip install 'headmaster\[ray\]'"):
        require_ray()
    one_error_line(invoke(ws, "embed", "--engine", "ray", ok=False), r"needs Ray Data.*headmaster\[ray\]")


# -- on the module's local Ray instance ------------------------------------------------------------------

def test_ray_vectors_equal_the_local_engine_and_bad_files_are_recorded(ray_local, tmp_path, clip_path):
    local = colour_workspace(tmp_path / "local", clip_path, bad=True)
    remote = colour_workspace(tmp_path / "ray", clip_path, bad=True)
    local_out = invoke(local, "embed").output
    out = invoke(remote, "embed", "--engine", "ray", "--workers", "1").output
    assert re.search(r"Embedded 21 images with tiny-clip on Ray \(1 workers\) \(0 cached, 3 failed\) in "
                     r"[\d.]+s, [\d.]+ img/s", out), out
    for line in ("Skipped heads/colour/red/empty.jpg: empty file", "Skipped heads/colour/red/text.png: not an image",
                 "Skipped heads/colour/red/cut.jpg: truncated or corrupt"):
        assert line in out and line in local_out
    lv, lfiles, lbad = cache_of(local)
    rv, rfiles, rbad = cache_of(remote)
    assert len(rv) == 21 and set(rv) == set(lv)
    assert max(float(np.abs(rv[h] - lv[h]).max()) for h in rv) < 1e-5
    assert rbad == lbad and len(rbad) == 3  # empty, not an image, truncated: remembered as the local path does
    assert sorted(Path(p).name for p in rfiles) == sorted(Path(p).name for p in lfiles)  # the file index too
    again = invoke(remote, "embed", "--engine", "ray").output
    assert "Embedded 0 images" in again and "(21 cached, 3 failed)" in again
    assert len(cache_of(remote)[0]) == 21


def test_an_actor_killed_mid_run_is_restarted_and_every_file_is_cached_once(ray_local, tmp_path, clip_path):
    ws = colour_workspace(tmp_path, clip_path, n=12)
    paths = sorted((ws / "heads").rglob("*.png"))
    killed: list[int] = []
    workers: set[int] = set()

    def kill_first_worker(batch: dict) -> None:
        workers.update(int(w) for w in batch["worker"])
        if not killed:
            killed.append(int(batch["worker"][0]))
            os.kill(killed[0], signal.SIGKILL)

    with Context.open(str(ws), EmbedOptions(device="cpu", progress=False)) as c:
        model = c.active_model()
        # the PyTorch backend here (the other tests take ONNX Runtime): the HF processor travels to the decode tasks
        result = embed_paths_ray(c.store, model, paths, RayOptions(workers=1, batch_size=4, backend="torch"),
                                 on_batch=kill_first_worker)
        assert result.backend == "torch"
        assert not result.skipped and len(result.hashes) == 24
        count = c.store.conn.execute("SELECT COUNT(*), COUNT(DISTINCT hash) FROM embeddings").fetchone()
        assert count == (24, 24)
        assert c.store.cached_hashes(model.id, result.hashes.values()) == set(result.hashes.values())
    assert killed and len(workers - set(killed)) >= 1  # a new actor process took over after the kill


def test_parquet_out_then_import_then_train_embeds_nothing(ray_local, tmp_path, clip_path):
    from headmaster.heads import train_one

    first = colour_workspace(tmp_path / "cluster", clip_path)
    out = tmp_path / "vectors"
    result = invoke(first, "embed", "--engine", "ray", "--out", str(out))
    assert "Embedded 20 images" in result.output and "hm vectors import" in result.output
    assert cache_of(first)[0] == {}  # the driver wrote no vector into headmaster.db
    fresh = colour_workspace(tmp_path / "laptop", clip_path)
    assert "Imported 20 new vectors (0 already cached) from 1 file: tiny-clip 20" in \
        invoke(fresh, "vectors", "import", str(out)).output
    with Context.open(str(fresh), EmbedOptions(device="cpu", progress=False)) as c:
        report = train_one(c, "colour")
    assert report.embed.embedded == 0 and report.embed.cached == 20 and report.images == 20


def test_classify_on_ray_agrees_with_local_classify(ray_local, tmp_path, clip_path):
    ws = colour_workspace(tmp_path, clip_path)
    invoke(ws, "train", "--epochs", "5")
    src = tmp_path / "incoming"
    fill_bucket(src, "red", 3, 500)
    fill_bucket(src, "blue", 3, 600)
    (src / "copy.png").write_bytes((ws / "heads" / "colour" / "red" / "red_000.png").read_bytes())  # cached content
    (src / "broken.png").write_text("not an image")
    twin = tmp_path / "twin"
    shutil.copytree(ws, twin)  # the same trained head and cache: one classifies locally, the other on Ray
    local = invoke(twin, "classify", "--heads", "colour", "--src", str(src), "--format", "csv").output
    target = tmp_path / "rows.parquet"
    result = invoke(ws, "classify", "--engine", "ray", "--heads", "colour", "--src", str(src), "--format", "parquet",
                    "--output", str(target))
    assert "Skipped broken.png: not an image" in result.output and "Wrote 7 rows (colour)" in result.output
    assert re.search(r"Embedded 6 images .* \(1 cached, 1 failed\)", result.output), result.output
    import pyarrow.parquet as pq

    local_rows = list(csv.DictReader(io.StringIO(local[local.index("image,"):])))
    ray_rows = pq.read_table(target).to_pylist()
    assert len(ray_rows) == len(local_rows) == 7
    assert list(ray_rows[0])[:3] == ["image", "path", "hash"] and list(ray_rows[0])[3:] == list(local_rows[0])[1:]
    for mine, theirs in zip(ray_rows, local_rows):
        assert mine["image"] == theirs["image"] and Path(mine["path"]) == (src / mine["image"]).absolute()
        assert mine["colour_prediction"] == theirs["colour_prediction"]
        assert abs(mine["colour_red"] - float(theirs["colour_red"])) < 1e-4  # the CSV rounds to 4 decimals
    one_error_line(invoke(ws, "classify", "--engine", "ray", "--head", "colour", "--src", str(src), "--sidecar",
                          "txt", ok=False), r"--engine ray writes rows only")


def test_a_path_missing_on_a_worker_is_one_clear_line(ray_local, tmp_path):
    with pytest.raises(HeadmasterError, match=r"nope\.png is not readable on Ray node .*same path as the driver"):
        check_readable_on_workers(tmp_path / "nope.png")
