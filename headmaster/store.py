"""headmaster.db: the model registry, the embedding cache, the file index and the sort log.

SQLite used plainly. WAL mode and a busy timeout let the daemon and the CLI share
one database; every write is a short transaction.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from headmaster import HeadmasterError

if TYPE_CHECKING:  # numpy loads with the first vector: `hm --help` and friends do not pay for it
    import numpy as np

BUSY_TIMEOUT_MS = 30_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY,
    name TEXT UNIQUE NOT NULL,
    path TEXT NOT NULL,
    embed_dim INTEGER NOT NULL,
    active INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS embeddings (
    hash TEXT NOT NULL,
    model_id INTEGER NOT NULL REFERENCES models(id),
    vector BLOB NOT NULL,
    PRIMARY KEY (hash, model_id)
);
-- stat signature -> content hash, so unchanged files are never read twice
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS files_hash ON files(hash);
-- one row per file that headmaster sorted (CLI classify or the daemon)
CREATE TABLE IF NOT EXISTS sorts (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    head TEXT NOT NULL,
    source TEXT NOT NULL,
    destination TEXT NOT NULL,
    hash TEXT,
    bucket TEXT NOT NULL,
    score REAL
);
CREATE INDEX IF NOT EXISTS sorts_destination ON sorts(destination);
-- vectors of horizontally flipped images (test-time augmentation), kept apart from the seed's table
CREATE TABLE IF NOT EXISTS flip_embeddings (
    hash TEXT NOT NULL,
    model_id INTEGER NOT NULL REFERENCES models(id),
    vector BLOB NOT NULL,
    PRIMARY KEY (hash, model_id)
);
CREATE INDEX IF NOT EXISTS sorts_source ON sorts(source);
-- contents a model could not use (corrupt, not an image), so a re-run skips them without loading the model;
-- `pillow` is the decoder's version: an upgrade retries them
CREATE TABLE IF NOT EXISTS unusable (
    hash TEXT NOT NULL,
    model_id INTEGER NOT NULL REFERENCES models(id),
    reason TEXT NOT NULL,
    pillow TEXT NOT NULL,
    PRIMARY KEY (hash, model_id)
);
"""


@dataclass(frozen=True)
class Model:
    id: int
    name: str
    path: str
    embed_dim: int
    active: bool


@dataclass(frozen=True)
class FileRecord:
    path: str
    size: int
    mtime_ns: int
    inode: int
    hash: str


def damaged_message(path: Path, error: Exception) -> str:
    """One line for a database SQLite cannot use (not a database, corrupt, or not ours)."""
    return (f"the database {path} is damaged or not a headmaster database ({error}); "
            f"`hm doctor` checks it, `hm doctor --rebuild-cache` sets it aside and starts a new one")


def vector_to_blob(vector: np.ndarray) -> bytes:
    import numpy as np

    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def blob_to_vector(blob: bytes) -> np.ndarray:
    import numpy as np

    return np.frombuffer(blob, dtype="<f4").copy()


IN_CHUNK = 900  # values per IN list: below SQLite's oldest parameter limit (999) with room for the others


def chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _vector_table(flipped: bool) -> str:
    return "flip_embeddings" if flipped else "embeddings"


class Store:
    """A connection to headmaster.db. Cheap to open; safe beside another process."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                    check_same_thread=False)
        try:
            self.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = NORMAL")
            self.conn.execute("PRAGMA foreign_keys = ON")
            tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables and "models" not in tables:  # someone else's database: never add our tables to it
                raise HeadmasterError(f"{self.path} is an SQLite database but not headmaster's (no 'models' table); "
                                      f"move it away or run `hm doctor`")
            self.conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            self.conn.close()
            raise HeadmasterError(damaged_message(self.path, e)) from None
        except HeadmasterError:
            self.conn.close()
            raise

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _rows_in(self, sql: str, params: tuple, values: Iterable) -> Iterator[tuple]:
        """Rows of `sql`, whose `{marks}` is an IN list, over `values` in chunks SQLite's parameter limit allows."""
        for part in chunks(list(values), IN_CHUNK):
            yield from self.conn.execute(sql.format(marks=",".join("?" * len(part))), (*params, *part))

    def _write(self, sql: str, rows: Iterable[tuple] | None = None) -> None:
        with self.conn:  # one short transaction
            self.conn.execute("BEGIN IMMEDIATE")
            if rows is None:
                self.conn.execute(sql)
            else:
                self.conn.executemany(sql, rows)

    # -- models ---------------------------------------------------------------
    def models(self) -> list[Model]:
        rows = self.conn.execute("SELECT id, name, path, embed_dim, active FROM models ORDER BY name").fetchall()
        return [Model(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]

    def model(self, name: str) -> Model:
        for m in self.models():
            if m.name == name:
                return m
        known = ", ".join(m.name for m in self.models()) or "none registered"
        raise HeadmasterError(f"unknown model '{name}' (models: {known})")

    def active_model(self) -> Model:
        for m in self.models():
            if m.active:
                return m
        if self.models():
            raise HeadmasterError("no active model: run `hm model-activate --name NAME`")
        raise HeadmasterError("no model registered: run `hm model-add --name NAME --path HF_ID_OR_FOLDER --dim DIM`")

    def add_model(self, name: str, path: str, embed_dim: int) -> Model:
        if not name.strip():
            raise HeadmasterError("model name must not be empty")
        if embed_dim <= 0:
            raise HeadmasterError(f"--dim must be a positive integer, got {embed_dim}")
        if any(m.name == name for m in self.models()):
            raise HeadmasterError(f"model '{name}' is already registered")
        first = not self.models()
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("INSERT INTO models (name, path, embed_dim, active) VALUES (?, ?, ?, ?)",
                              (name, path, embed_dim, 1 if first else 0))
        return self.model(name)

    def activate_model(self, name: str) -> Model:
        model = self.model(name)
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("UPDATE models SET active = CASE WHEN id = ? THEN 1 ELSE 0 END", (model.id,))
        return self.model(name)

    def remove_model(self, name: str) -> int:
        """Delete the model and its cached embeddings; return how many embeddings went."""
        model = self.model(name)
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            n = self.conn.execute("DELETE FROM embeddings WHERE model_id = ?", (model.id,)).rowcount
            self.conn.execute("DELETE FROM flip_embeddings WHERE model_id = ?", (model.id,))
            self.conn.execute("DELETE FROM unusable WHERE model_id = ?", (model.id,))
            self.conn.execute("DELETE FROM models WHERE id = ?", (model.id,))
        return n

    # -- embeddings -----------------------------------------------------------
    # flipped=True: the cache of horizontally flipped images (flip_embeddings), same keys and format.
    def cached_hashes(self, model_id: int, hashes: Iterable[str], flipped: bool = False) -> set[str]:
        sql = f"SELECT hash FROM {_vector_table(flipped)} WHERE model_id = ? AND hash IN ({{marks}})"
        return {r[0] for r in self._rows_in(sql, (model_id,), set(hashes))}

    def vectors(self, model_id: int, hashes: Iterable[str], flipped: bool = False) -> dict[str, np.ndarray]:
        sql = f"SELECT hash, vector FROM {_vector_table(flipped)} WHERE model_id = ? AND hash IN ({{marks}})"
        return {h: blob_to_vector(v) for h, v in self._rows_in(sql, (model_id,), set(hashes))}

    def put_vectors(self, model_id: int, items: Iterable[tuple[str, np.ndarray]], flipped: bool = False) -> None:
        self._write(f"INSERT OR REPLACE INTO {_vector_table(flipped)} (hash, model_id, vector) VALUES (?, ?, ?)",
                    [(h, model_id, vector_to_blob(v)) for h, v in items])

    def vector_hashes(self, model_id: int) -> set[str]:
        """Every content hash with a cached vector for `model_id` (what a cluster run's workers skip)."""
        return {r[0] for r in self.conn.execute("SELECT hash FROM embeddings WHERE model_id = ?", (model_id,))}

    def iter_vectors(self, model_id: int, chunk: int = 10_000) -> Iterator[list[tuple[str, bytes]]]:
        """Every cached (hash, little-endian float32 blob) of `model_id`, in hash order, `chunk` rows at a time."""
        after = ""
        while True:
            rows = self.conn.execute("SELECT hash, vector FROM embeddings WHERE model_id = ? AND hash > ? "
                                     "ORDER BY hash LIMIT ?", (model_id, after, chunk)).fetchall()
            if not rows:
                return
            yield rows
            after = rows[-1][0]

    def all_unusable(self, model_id: int, pillow: str) -> dict[str, str]:
        """hash -> reason for every content `model_id` could not use with this Pillow version."""
        return dict(self.conn.execute("SELECT hash, reason FROM unusable WHERE model_id = ? AND pillow = ?",
                                      (model_id, pillow)))

    def unusable(self, model_id: int, hashes: Iterable[str], pillow: str) -> dict[str, str]:
        """hash -> why `model_id` could not use that content, as found with this Pillow version."""
        sql = "SELECT hash, reason FROM unusable WHERE model_id = ? AND pillow = ? AND hash IN ({marks})"
        return dict(self._rows_in(sql, (model_id, pillow), set(hashes)))

    def put_unusable(self, model_id: int, items: Iterable[tuple[str, str]], pillow: str) -> None:
        self._write("INSERT OR REPLACE INTO unusable (hash, model_id, reason, pillow) VALUES (?, ?, ?, ?)",
                    [(h, model_id, reason, pillow) for h, reason in items])

    def embedding_count(self, model_id: int | None = None) -> int:
        if model_id is None:
            return self.conn.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]
        return self.conn.execute("SELECT COUNT(*) FROM embeddings WHERE model_id = ?", (model_id,)).fetchone()[0]

    # -- file index -----------------------------------------------------------
    def file_records(self, paths: Iterable[str]) -> dict[str, FileRecord]:
        return {path: FileRecord(path, *sig[:4]) for path, sig in self.file_signatures(paths).items()}

    def file_signatures(self, paths: Iterable[str], model_id: int | None = None, flipped: bool = False
                        ) -> dict[str, tuple[int, int, int, str, bool]]:
        """path -> (size, mtime_ns, inode, hash, has_vector) for the indexed ones (the re-run fast path).

        `has_vector`: whether `model_id` has a cached vector for that hash (False without a model); one
        query answers both, which is all an unchanged file costs.
        """
        cached = (f"EXISTS (SELECT 1 FROM {_vector_table(flipped)} e WHERE e.hash = f.hash AND e.model_id = ?)"
                  if model_id is not None else "0")
        sql = f"SELECT path, size, mtime_ns, inode, hash, {cached} FROM files f WHERE path IN ({{marks}})"
        return {r[0]: r[1:] for r in self._rows_in(sql, () if model_id is None else (model_id,), paths)}

    def files_under(self, prefix: str) -> list[FileRecord]:
        """Every indexed file whose path starts with `prefix` (a folder path with trailing /)."""
        rows = self.conn.execute(
            "SELECT path, size, mtime_ns, inode, hash FROM files WHERE path >= ? AND path < ?",
            (prefix, prefix + "\U0010ffff"))
        return [FileRecord(*r) for r in rows]

    def put_file_records(self, records: Iterable[FileRecord]) -> None:
        self._write("INSERT OR REPLACE INTO files (path, size, mtime_ns, inode, hash) VALUES (?, ?, ?, ?, ?)",
                    [(r.path, r.size, r.mtime_ns, r.inode, r.hash) for r in records])

    def forget_files(self, paths: Iterable[str]) -> None:
        self._write("DELETE FROM files WHERE path = ?", [(p,) for p in paths])

    # -- sort log -------------------------------------------------------------
    def log_sort(self, head: str, source: str, destination: str, hash_: str | None, bucket: str,
                 score: float | None) -> None:
        at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._write("INSERT INTO sorts (at, head, source, destination, hash, bucket, score) VALUES (?,?,?,?,?,?,?)",
                    [(at, head, source, destination, hash_, bucket, score)])

    def sort_destinations(self, source: str) -> list[str]:
        """Where files that came from `source` were placed, newest first."""
        rows = self.conn.execute("SELECT destination FROM sorts WHERE source = ? ORDER BY id DESC", (source,))
        return [r[0] for r in rows]

    def sorts(self, head: str | None = None, limit: int = 100) -> list[sqlite3.Row]:
        self.conn.row_factory = sqlite3.Row
        try:
            if head is None:
                return self.conn.execute("SELECT * FROM sorts ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
            return self.conn.execute("SELECT * FROM sorts WHERE head = ? ORDER BY id DESC LIMIT ?",
                                     (head, limit)).fetchall()
        finally:
            self.conn.row_factory = None
