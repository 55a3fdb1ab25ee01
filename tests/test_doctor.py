"""Damaged files of our own: one Error line from `hm`, `hm doctor` reports, `--rebuild-cache` keeps the damaged file."""

from __future__ import annotations

import re
import sqlite3

import pytest
from click.testing import CliRunner
from helpers import fill_bucket

from headmaster import HeadmasterError
from headmaster.cli import cli
from headmaster.curation.learning import UNCERTAIN as LEARNING_UNCERTAIN
from headmaster.embedding import add_model
from headmaster.heads import UNCERTAIN, read_checkpoint, read_checkpoint_meta
from headmaster.store import Store


@pytest.fixture
def hm(workspace):
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(cli, ["--workspace", str(workspace), *args], catch_exceptions=False)

    return invoke


def one_error_line(result, pattern: str) -> None:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("content", [b"\x00garbage" * 1000, b"SQLite format 3\x00" + b"\xff" * 4000])
def test_a_damaged_database_is_one_error_line_and_left_alone(hm, workspace, content):
    db = workspace / "headmaster.db"
    db.write_bytes(content)
    for args in (["status"], ["model-list"], ["embed"]):
        one_error_line(hm(*args), r"database .* is damaged or not a headmaster database")
    assert db.read_bytes() == content


def test_someone_elses_sqlite_database_is_refused_not_extended(hm, workspace):
    db = workspace / "headmaster.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER)")
    one_error_line(hm("model-list"), r"not headmaster's")
    with sqlite3.connect(db) as conn:
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")] == ["photos"]


def test_checkpoint_metadata_without_torch_matches_torch(clip_ctx, colour_head):
    from headmaster.heads import train_one

    train_one(clip_ctx, "colour")
    path = clip_ctx.workspace.checkpoint_path("colour")
    meta, full = read_checkpoint_meta(path), read_checkpoint(path)
    for key in ("type", "model", "classes", "threshold", "sources", "metadata", "input_dim"):
        assert meta[key] == full[key]
    assert UNCERTAIN == LEARNING_UNCERTAIN


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint at all", r"not a torch checkpoint"),
    (None, r"not a headmaster checkpoint"),
])
def test_damaged_or_foreign_checkpoints(hm, workspace, tmp_path, content, message):
    import torch

    path = workspace / "out" / "colour.pt"
    path.parent.mkdir(parents=True)
    if content is None:
        torch.save({"weights": torch.zeros(3)}, path)  # a torch file, but not ours
    else:
        path.write_bytes(content)
    with pytest.raises(HeadmasterError, match=message):
        read_checkpoint_meta(path)
    fill_bucket(workspace / "heads" / "colour" / "red", "red", 2, 0)
    (tmp_path / "src").mkdir()
    one_error_line(hm("classify", "--head", "colour", "--src", str(tmp_path / "src")), r"checkpoint")
    result = hm("doctor")
    assert result.exit_code == 1 and "DAMAGED  checkpoint colour" in result.output


def test_doctor_reports_a_bad_config(hm, workspace):
    (workspace / "config.toml").write_text("[daemon]\ndebounce = 3\n")
    result = hm("doctor")
    assert result.exit_code == 1
    assert re.search(r"DAMAGED  config: .*unknown key 'daemon.debounce'", result.output)
    assert "ok       database" in result.output


def test_rebuild_cache_keeps_the_damaged_file_and_the_registry(hm, workspace, clip_path):
    import numpy as np

    fill_bucket(workspace / "heads" / "colour" / "red", "red", 3, 0)
    fill_bucket(workspace / "heads" / "colour" / "blue", "blue", 3, 100)
    db = workspace / "headmaster.db"
    with Store(db) as store:
        add_model(store, "tiny-clip", str(clip_path), 24)
        store.put_vectors(1, [(f"h{i}", np.zeros(256, dtype="f4")) for i in range(2000)])
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA journal_mode = DELETE")
    data = bytearray(db.read_bytes())  # the second half (cached vectors) damaged; the registry still readable
    data[len(data) // 2 :] = b"\xee" * (len(data) - len(data) // 2)
    db.write_bytes(bytes(data))
    checked = hm("doctor")
    assert checked.exit_code == 1 and "DAMAGED  database" in checked.output
    assert db.read_bytes() == bytes(data)  # checking changes nothing
    result = hm("doctor", "--rebuild-cache")
    assert result.exit_code == 0, result.output
    kept = list(workspace.glob("headmaster.db.damaged-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == bytes(data)
    assert "1 model(s) registered, 6 image(s) embedded" in result.output
    assert hm("doctor").exit_code == 0
    with Store(db) as store:
        assert store.active_model().name == "tiny-clip" and store.embedding_count() == 6


def test_rebuild_cache_leaves_a_healthy_database_alone(hm, workspace):
    with Store(workspace / "headmaster.db"):
        pass
    result = hm("doctor", "--rebuild-cache")
    assert result.exit_code == 0 and not list(workspace.glob("headmaster.db.damaged-*"))


def test_rebuild_cache_carries_over_the_sort_log_and_the_corrections(hm, workspace, clip_path):
    """The user's history survives a rebuild: every readable row is copied, and the output counts what was lost."""
    import numpy as np

    from headmaster.curation.learning import ensure_schema

    fill_bucket(workspace / "heads" / "colour" / "red", "red", 3, 0)
    fill_bucket(workspace / "heads" / "colour" / "blue", "blue", 3, 100)
    db = workspace / "headmaster.db"
    with Store(db) as store:
        add_model(store, "tiny-clip", str(clip_path), 24)
        ensure_schema(store)
        for i in range(300):
            store.log_sort("colour", f"/inbox/colour/{i}.png", f"/classified/colour/red/{i}.png", f"s{i}", "red", 0.9)
        with store.conn:
            store.conn.executemany(
                "INSERT INTO corrections (at, head, hash, bucket, source, example, kind) VALUES (?,?,?,?,?,?,?)",
                [("2026-12-01T10:00:00", "colour", f"c{i}", "blue", f"/c/{i}.png", f"/h/{i}.png", "correction")
                 for i in range(40)])
        store.put_vectors(1, [(f"h{i}", np.zeros(256, dtype="f4")) for i in range(2000)])  # written last: the tail
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA journal_mode = DELETE")
        sorts = conn.execute("SELECT at, head, source, destination, hash, bucket, score FROM sorts").fetchall()
        fixes = conn.execute("SELECT at, head, hash, bucket, source, example, kind FROM corrections").fetchall()
    data = bytearray(db.read_bytes())  # the last third (cached vectors) damaged; the history still readable
    data[2 * len(data) // 3 :] = b"\xee" * (len(data) - 2 * len(data) // 3)
    db.write_bytes(bytes(data))
    result = hm("doctor", "--rebuild-cache")
    assert result.exit_code == 0, result.output
    assert "300 sorts row(s) recovered, 0 lost; 40 corrections row(s) recovered, 0 lost" in result.output
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT at, head, source, destination, hash, bucket, score FROM sorts").fetchall() == sorts
        assert conn.execute("SELECT at, head, hash, bucket, source, example, kind FROM corrections").fetchall() == fixes


def test_salvage_skips_a_damaged_page_and_counts_the_rows_lost(tmp_path):
    from headmaster.curation.doctor import salvage_table

    db = tmp_path / "t.db"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA page_size = 1024")
        conn.execute("CREATE TABLE sorts (id INTEGER PRIMARY KEY, note TEXT)")
        conn.executemany("INSERT INTO sorts (note) VALUES (?)", [(f"row {i:05d} " + "x" * 80,) for i in range(2000)])
    data = bytearray(db.read_bytes())
    page = 100  # a leaf page in the middle of the table's b-tree
    data[page * 1024 : (page + 1) * 1024] = b"\xee" * 1024
    db.write_bytes(bytes(data))
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        got = salvage_table(conn, "sorts", ("note",))
    finally:
        conn.close()
    assert got.error is not None  # the damage was met, not hidden
    assert 1900 <= len(got.rows) < 2000  # one page of ~9 rows lost, the rest read around it
    notes = [r[0] for r in got.rows]
    assert notes == sorted(notes) and notes[0].startswith("row 00000") and notes[-1].startswith("row 01999")
    assert got.lost is None or got.lost == 2000 - len(got.rows)
