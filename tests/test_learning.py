"""Learning from corrections, as library calls (the daemon's side is in test_daemon.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import colour_image, run_hm

from headmaster import HeadmasterError
from headmaster.curation import (confirmable, correction_counts, corrections_log, ensure_schema, is_correction, learn,
                                 unlearn)
from headmaster.embedding import file_sha256
from headmaster.store import Store
from headmaster.workspace import Workspace


@pytest.fixture
def site(workspace):
    ws = Workspace(workspace)
    for b in ("red", "blue"):
        (ws.heads_dir / "colour" / b).mkdir(parents=True)
    store = Store(ws.db_path)
    ensure_schema(store)
    yield ws, store
    store.close()


def sorted_file(ws: Workspace, store: Store, bucket: str, seed: int, at: str | None = None) -> tuple[Path, str]:
    """A file as the daemon would have sorted it, with its sort-log row."""
    path = colour_image(ws.classified_dir / "colour" / bucket / f"img_{seed}.png", "red", seed)
    h = file_sha256(path)
    store.log_sort("colour", f"/inbox/colour/img_{seed}.png", str(path), h, bucket, 0.9)
    if at:
        store.conn.execute("UPDATE sorts SET at = ? WHERE destination = ?", (at, str(path)))
    return path, h


def test_own_placements_are_not_corrections(site):
    ws, store = site
    path, h = sorted_file(ws, store, "red", 1)
    assert not is_correction(store, "colour", "red", path, h)
    moved = path.parent.parent / "blue" / path.name
    moved.parent.mkdir()
    os.rename(path, moved)
    assert is_correction(store, "colour", "blue", moved, h)
    assert not is_correction(store, "colour", "uncertain", moved, h)
    assert not is_correction(store, "colour", "_rejected", moved, h)


def test_learn_links_once_then_moves(site):
    ws, store = site
    path, h = sorted_file(ws, store, "red", 2)
    first = learn(store, ws, "colour", "blue", path, h)
    assert first.action == "added" and first.example == ws.heads_dir / "colour" / "blue" / f"{h}.png"
    assert os.stat(first.example).st_ino == os.stat(path).st_ino  # a hard link: no second copy on disk
    assert store.file_records([str(first.example)])[str(first.example)].hash == h  # vector reused, never re-read
    assert learn(store, ws, "colour", "blue", path, h).action == "unchanged"
    again = learn(store, ws, "colour", "red", path, h)
    assert again.action == "moved" and again.previous == "blue"
    assert not first.example.exists() and again.example.exists()
    # the file sits where headmaster sorted it and that agrees with its latest label: nothing to learn
    assert is_correction(store, "colour", "red", path, h) is False
    assert correction_counts(store, "colour") == {"corrections": 2, "confirmed": 0, "examples": 1}
    assert [r.kind for r in corrections_log(store, "colour")] == ["correction", "correction"]


def test_unlearn_removes_the_example_but_never_the_image(site):
    ws, store = site
    path, h = sorted_file(ws, store, "red", 3)
    example = learn(store, ws, "colour", "blue", path, h).example
    assert unlearn(store, ws, "colour", path) == example
    assert not example.exists() and path.exists()
    with pytest.raises(HeadmasterError, match="not an example"):
        unlearn(store, ws, "colour", path)
    # the corrected file is gone: unlearning the example itself moves it back instead of deleting it
    example = learn(store, ws, "colour", "blue", path, h).example
    path.unlink()
    unlearn(store, ws, "colour", example)
    assert not example.exists()
    assert (ws.classified_dir / "colour" / "blue" / example.name).is_file()


def test_confirmable_after_days(site):
    ws, store = site
    old, h_old = sorted_file(ws, store, "red", 4, at="2020-01-01T00:00:00+0000")
    sorted_file(ws, store, "red", 5)  # sorted just now: not yet
    unsure, _ = sorted_file(ws, store, "uncertain", 6, at="2020-01-01T00:00:00+0000")  # never confirmed
    changed, _ = sorted_file(ws, store, "blue", 7, at="2020-01-01T00:00:00+0000")
    changed.write_bytes(changed.read_bytes() + b"x")  # no longer what was sorted
    found = confirmable(store, ws, 3)
    assert [(head, bucket, p) for head, bucket, p, _ in found] == [("colour", "red", old)]
    learn(store, ws, "colour", "red", old, h_old, kind="confirmed")
    assert confirmable(store, ws, 3) == []


def test_hm_unlearn_and_corrections(site, workspace):
    ws, store = site
    path, h = sorted_file(ws, store, "red", 8)
    learn(store, ws, "colour", "blue", path, h)
    r = run_hm(["corrections", "--head", "colour"], workspace)
    assert r.returncode == 0 and "correction" in r.stdout and "blue" in r.stdout
    r = run_hm(["unlearn", "--head", "colour", str(path)], workspace)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"Unlearned colour/blue/{h}.png")
    r = run_hm(["unlearn", "--head", "colour", str(path)], workspace)
    assert r.returncode == 1 and r.stderr.startswith("Error: ")
