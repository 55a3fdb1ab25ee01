"""`hm doctor`: check headmaster's own files (database, checkpoints, config) and, when asked, rebuild the cache.

Checking reads only: the database is opened read-only, checkpoints are loaded the way
`hm classify` loads them, the config is parsed and validated. Nothing is changed.

`rebuild_cache` (`hm doctor --rebuild-cache`) acts only on a damaged database: it is
renamed aside (`headmaster.db.damaged-<time>`, with its -wal/-shm files), a new one is
created, and every row of the user's history that SQLite can still read is carried
over from the damaged file (the model registry, the sort log, the corrections: `HISTORY`,
reported as recovered and lost per table); every labelled image under heads/ is then
embedded again with the active model. Vectors and the file index are not carried over: a
damaged page can hold wrong bytes SQLite does not notice, and both are rebuilt from the
images. The images themselves are never touched; the damaged file is kept for the user.
Stop hmd first (it holds the database open): `hm doctor --rebuild-cache` refuses while
hmd's lock on the workspace is held.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from headmaster import HeadmasterError
from headmaster.store import Model, Store
from headmaster.workspace import Workspace

if TYPE_CHECKING:
    from headmaster.embedding import EmbedOptions

DB_SIDE_FILES = ("-wal", "-shm")
# the user's history, carried over from a damaged database row by row: table -> its columns but the id
HISTORY = {
    "sorts": ("at", "head", "source", "destination", "hash", "bucket", "score"),
    "corrections": ("at", "head", "hash", "bucket", "source", "example", "kind"),
}
SALVAGE_CHUNK = 1000  # rows read at once; around a damaged page, one at a time


@dataclass(frozen=True)
class Finding:
    what: str  # 'database', 'checkpoint colour', 'config'
    ok: bool
    detail: str


@dataclass
class RebuildReport:
    moved_aside: list[Path] = field(default_factory=list)
    models: list[Model] = field(default_factory=list)  # copied into the new database
    lost_models: str | None = None  # why the registry could not be copied
    embedded: int = 0
    heads: list[str] = field(default_factory=list)
    history: dict[str, "Salvaged"] = field(default_factory=dict)  # table -> what came across (HISTORY)


@dataclass
class Salvaged:
    """What could be read of one table of a damaged database."""

    rows: list[tuple] = field(default_factory=list)
    total: int | None = None  # count(*) when SQLite could still count them
    error: str | None = None  # the first read error met, if any

    @property
    def lost(self) -> int | None:
        if self.total is not None:
            return max(0, self.total - len(self.rows))
        return None if self.error else 0


def check_database(ws: Workspace) -> Finding:
    path = ws.db_path
    if not path.exists():
        return Finding("database", True, f"{path}: not created yet (the first command creates it)")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "models" not in tables:
                return Finding("database", False, f"{path}: an SQLite database, but not headmaster's (no 'models' "
                                                  f"table)")
            check = conn.execute("PRAGMA quick_check").fetchall()
            models = conn.execute("SELECT COUNT(*) FROM models").fetchone()[0]
            vectors = conn.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0] if "embeddings" in tables else 0
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        return Finding("database", False, f"{path}: damaged or not a database ({e})")
    if check != [("ok",)]:
        lines = [ln for r in check for ln in str(r[0]).splitlines() if not ln.startswith("***")]
        first = "; ".join(lines[:2])[:200] + (f"; {len(lines) - 2} more" if len(lines) > 2 else "")
        return Finding("database", False, f"{path}: integrity check failed ({first})")
    return Finding("database", True, f"{path}: ok ({models} model(s), {vectors} cached vector(s))")


def check_checkpoints(ws: Workspace) -> list[Finding]:
    """Every out/*.pt loaded as `hm classify` would load it (torch, weights_only=True)."""
    out = []
    for path in sorted(ws.out_dir.glob("*.pt")) if ws.out_dir.is_dir() else []:
        from headmaster.heads import load_head  # torch: only when there is a checkpoint to load

        try:
            trained = load_head(path)
        except HeadmasterError as e:
            out.append(Finding(f"checkpoint {path.stem}", False, str(e)))
        else:
            out.append(Finding(f"checkpoint {path.stem}", True,
                               f"{path}: ok ({trained.type}, {len(trained.classes)} classes, model "
                               f"'{trained.model_name}')"))
    return out


def check_config(ws: Workspace, config_path: str | None = None) -> Finding:
    from headmaster.config import find_config, read_config

    found = find_config(config_path, str(ws.root))
    if found is None:
        return Finding("config", True, "no config file: hmd uses the defaults")
    try:
        read_config(found)
    except HeadmasterError as e:
        return Finding("config", False, str(e))
    return Finding("config", True, f"{found}: ok")


def diagnose(ws: Workspace, config_path: str | None = None) -> list[Finding]:
    return [check_database(ws), *check_checkpoints(ws), check_config(ws, config_path)]


def _daemon_running(ws: Workspace) -> bool:
    lock = ws.root / ".hmd.lock"
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _read_models(path: Path) -> list[tuple[str, str, int, bool]]:
    """(name, path, dim, active) rows of a damaged database's registry, if SQLite can still read them."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [(r[0], r[1], int(r[2]), bool(r[3])) for r in
                conn.execute("SELECT name, path, embed_dim, active FROM models ORDER BY id")]
    finally:
        conn.close()


def salvage_table(conn: sqlite3.Connection, table: str, columns: tuple[str, ...]) -> Salvaged:
    """Every row of `table` that SQLite can still read, in rowid order, skipping damaged pages.

    Rows are read in chunks; a chunk that fails is read again one row at a time, so one bad
    page loses only the rows on it. Never raises for a damaged file.
    """
    out = Salvaged()
    cols = ", ".join(columns)
    try:
        out.total = int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    except sqlite3.DatabaseError as e:
        out.error = str(e)
    try:
        top = conn.execute(f"SELECT max(rowid) FROM {table}").fetchone()[0]
    except sqlite3.DatabaseError as e:
        out.error, top = out.error or str(e), None
    last = 0
    while True:
        try:
            chunk = conn.execute(f"SELECT rowid, {cols} FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT ?",
                                 (last, SALVAGE_CHUNK)).fetchall()
        except sqlite3.DatabaseError as e:
            out.error = out.error or str(e)
            if top is None or last >= top:
                break
            end = min(last + SALVAGE_CHUNK, top)
            for rowid in range(last + 1, end + 1):  # around the damage: one row at a time
                try:
                    row = conn.execute(f"SELECT {cols} FROM {table} WHERE rowid = ?", (rowid,)).fetchone()
                except sqlite3.DatabaseError:
                    continue
                if row is not None:
                    out.rows.append(tuple(row))
            last = end
            continue
        if not chunk:
            break
        out.rows.extend(tuple(r[1:]) for r in chunk)
        last = chunk[-1][0]
    return out


def _salvage_history(path: Path) -> dict[str, Salvaged]:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.DatabaseError as e:
        return {t: Salvaged(error=str(e)) for t in HISTORY}
    try:
        found = {}
        for table, columns in HISTORY.items():
            try:
                conn.execute(f"SELECT {', '.join(columns)} FROM {table} LIMIT 0")
            except sqlite3.OperationalError as e:
                if "no such table" in str(e):
                    found[table] = Salvaged(total=0)  # an older database without it: nothing to lose
                    continue
                found[table] = Salvaged(error=str(e))
                continue
            except sqlite3.DatabaseError as e:
                found[table] = Salvaged(error=str(e))
                continue
            found[table] = salvage_table(conn, table, columns)
        return found
    finally:
        conn.close()


def rebuild_cache(ws: Workspace, embed: bool = True, options: "EmbedOptions | None" = None) -> RebuildReport:
    """Set a damaged database aside and build a new one (registry copied where readable, vectors re-embedded)."""
    finding = check_database(ws)
    if finding.ok:
        raise HeadmasterError(f"the database is fine ({finding.detail}); nothing to rebuild")
    if _daemon_running(ws):
        raise HeadmasterError("hmd is running on this workspace; stop it first (it holds the database open)")
    report = RebuildReport()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    try:
        rows = _read_models(ws.db_path)
    except sqlite3.DatabaseError as e:
        rows, report.lost_models = [], str(e)
    report.history = _salvage_history(ws.db_path)
    for suffix in ("", *DB_SIDE_FILES):
        src = Path(f"{ws.db_path}{suffix}")
        if src.exists():
            dst = Path(f"{ws.db_path}.damaged-{stamp}{suffix}")
            os.rename(src, dst)  # kept for the user, never deleted
            report.moved_aside.append(dst)
    with Store(ws.db_path) as store:
        for name, path, dim, active in rows:
            store.add_model(name, path, dim)
        for name, _, _, active in rows:
            if active:
                store.activate_model(name)
        report.models = store.models()
        from headmaster.curation.learning import ensure_schema

        ensure_schema(store)  # the corrections table
        with store.conn:
            for table, salvaged in report.history.items():
                columns = HISTORY[table]
                store.conn.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                                       f"({', '.join('?' * len(columns))})", salvaged.rows)
    if embed and report.models and ws.head_names():
        from headmaster.embedding import Context, EmbedOptions
        from headmaster.heads import embed_heads

        with Context(ws, Store(ws.db_path), options or EmbedOptions()) as ctx:
            embedded = embed_heads(ctx, None, "Rebuilding the cache")
        report.embedded, report.heads = embedded.result.embedded, embedded.heads
    return report
