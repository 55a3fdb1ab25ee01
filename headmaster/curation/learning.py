"""Learning from corrections: a file the user files under `classified/<head>/<bucket>/` becomes an example.

The example is a hard link (else a fsynced copy) of the corrected file, placed in
`heads/<head>/<bucket>/` under its content-hash name, so the cached vector is
reused and a file corrected twice is moved, never duplicated. Every example
added, moved or removed this way is a row in the `corrections` table.
Nothing here deletes the last copy of an image.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path


from headmaster import HeadmasterError
from headmaster.embedding import Context, file_sha256, hash_paths
from headmaster.fileops import copy_into, fsync_dir, move_into
from headmaster.store import FileRecord, Store
from headmaster.workspace import NOT_BUCKET_PREFIXES, Workspace, list_images

# hmd's supervisor imports this module and must not import torch: heads and sorting are imported where used
UNCERTAIN = "uncertain"  # heads.UNCERTAIN
NOT_LABELS = frozenset({UNCERTAIN, "_rejected"})  # folders in classified/<head>/ that teach nothing
MAX_BUCKET_NAME = 100  # characters; a folder name, and a label on the page


def check_bucket_name(name: str) -> str:
    """`name` (stripped) if it can name a new bucket folder heads/<head>/<name>/; else one HeadmasterError saying
    the rules: a single folder name, not starting with '.' or '_' (those folders are not buckets), not 'uncertain'."""
    name = name.strip()
    rules = (f"a bucket name is one folder name of at most {MAX_BUCKET_NAME} characters, without / \\ : * ? \" < > |, "
             f"not starting with '.' or '_' and not '{UNCERTAIN}'")
    if not name or len(name) > MAX_BUCKET_NAME or name.startswith(NOT_BUCKET_PREFIXES) or name in NOT_LABELS \
            or any(c in name for c in '/\\:*?"<>|') or not name.isprintable():
        raise HeadmasterError(f"cannot make a bucket {name[:MAX_BUCKET_NAME]!r}: {rules}")
    return name

SCHEMA = """
CREATE TABLE IF NOT EXISTS corrections (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    head TEXT NOT NULL,
    hash TEXT NOT NULL,
    bucket TEXT NOT NULL,
    source TEXT NOT NULL,   -- the file the user placed (or left in place, for 'confirmed')
    example TEXT NOT NULL,  -- the example in heads/<head>/<bucket>/
    kind TEXT NOT NULL      -- 'correction', 'confirmed' or 'unlearned'
);
CREATE INDEX IF NOT EXISTS corrections_head_hash ON corrections(head, hash);
CREATE TABLE IF NOT EXISTS review_skips (  -- images the user skipped on the review page: not offered again
    head TEXT NOT NULL,
    hash TEXT NOT NULL,     -- the image's content
    at TEXT NOT NULL,
    PRIMARY KEY (head, hash)
);
"""


def ensure_schema(store: Store) -> None:
    store.conn.executescript(SCHEMA)


def review_skips(store: Store) -> set[tuple[str, str]]:
    """(head, hash) of every image skipped on the review page (kept across restarts of hmd and hm serve)."""
    return set(store.conn.execute("SELECT head, hash FROM review_skips"))


def record_skip(store: Store, head: str, hash_: str, skipped: bool = True) -> None:
    """Remember a skip, or (`skipped=False`, an undo) forget it."""
    with store.conn:
        store.conn.execute("BEGIN IMMEDIATE")
        if skipped:
            store.conn.execute("INSERT OR REPLACE INTO review_skips (head, hash, at) VALUES (?, ?, ?)",
                               (head, hash_, datetime.now(timezone.utc).isoformat(timespec="seconds")))
        else:
            store.conn.execute("DELETE FROM review_skips WHERE head = ? AND hash = ?", (head, hash_))


@dataclass(frozen=True)
class Learned:
    head: str
    bucket: str
    hash: str
    example: Path
    action: str  # 'added', 'moved' or 'unchanged'
    previous: str | None = None  # the bucket it was an example of before


def _latest(store: Store, head: str, hash_: str) -> tuple[str, str, str] | None:
    """(bucket, example, kind) of the newest corrections row for this content."""
    return store.conn.execute("SELECT bucket, example, kind FROM corrections WHERE head = ? AND hash = ? "
                              "ORDER BY id DESC LIMIT 1", (head, hash_)).fetchone()


def _record(store: Store, head: str, hash_: str, bucket: str, source: Path, example: Path, kind: str) -> None:
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with store.conn:
        store.conn.execute("BEGIN IMMEDIATE")
        store.conn.execute("INSERT INTO corrections (at, head, hash, bucket, source, example, kind) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", (at, head, hash_, bucket, str(source), str(example), kind))


def _index(store: Store, path: Path, hash_: str) -> None:
    """Tell the file index the new path's hash, so the file is never read again for it."""
    st = os.stat(path)
    store.put_file_records([FileRecord(str(path), st.st_size, st.st_mtime_ns, st.st_ino, hash_)])


def is_own_placement(store: Store, path: Path, bucket: str, hash_: str) -> bool:
    """True when the sort log says headmaster itself put this content at this path."""
    row = store.conn.execute("SELECT bucket, hash FROM sorts WHERE destination = ? ORDER BY id DESC LIMIT 1",
                             (str(path),)).fetchone()
    return row is not None and row[0] == bucket and row[1] == hash_


def is_correction(store: Store, head: str, bucket: str, path: Path, hash_: str) -> bool:
    """Should this file in classified/<head>/<bucket>/ teach the head?

    Not when headmaster itself sorted it there, unless an earlier correction labelled
    the same content otherwise (the user moved it away and back: the latest bucket wins).
    """
    if bucket in NOT_LABELS or bucket.startswith((".", "_")):
        return False
    if not is_own_placement(store, path, bucket, hash_):
        return True
    latest = _latest(store, head, hash_)
    return latest is not None and latest[2] != "unlearned" and latest[0] != bucket


def learn(store: Store, ws: Workspace, head: str, bucket: str, path: Path, hash_: str,
          kind: str = "correction") -> Learned:
    """Make the content of `path` an example of heads/<head>/<bucket>/ (once, under its hash name).

    Already an example of another bucket by an earlier correction: that example is moved.
    """
    if bucket in NOT_LABELS or bucket.startswith("."):
        raise HeadmasterError(f"'{bucket}' is not a bucket one can learn from")
    folder = ws.heads_dir / head / bucket
    target = folder / f"{hash_}{Path(path).suffix.lower()}"
    latest = _latest(store, head, hash_)
    if latest and latest[2] != "unlearned" and Path(latest[1]).exists():
        previous, example = latest[0], Path(latest[1])
        if example == target:
            return Learned(head, bucket, hash_, target, "unchanged", previous)
        folder.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(target):  # same hash name, same content: the other bucket's example just goes
            os.unlink(example)
        else:
            os.rename(example, target)
            fsync_dir(folder)
        store.forget_files([str(example)])
        _index(store, target, hash_)
        _record(store, head, hash_, bucket, path, target, kind)
        return Learned(head, bucket, hash_, target, "moved", previous)
    folder.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(target):
        return Learned(head, bucket, hash_, target, "unchanged")
    try:
        os.link(path, target)
        fsync_dir(folder)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        target = copy_into(Path(path), folder, target.name)
    _index(store, target, hash_)
    _record(store, head, hash_, bucket, path, target, kind)
    return Learned(head, bucket, hash_, target, "added")


LIBRARY = "library"  # the corrections kind of an example copied in from a photo library


def learn_copy(store: Store, ws: Workspace, head: str, bucket: str, source: Path, hash_: str) -> Learned:
    """Make a library photo an example of heads/<head>/<bucket>/ by COPYING it there (the review page's library
    queue). The photo stays where it is, untouched: the copy is written and fsynced under a temp name, then
    given the photo's own name (a clash gets a new name: fileops.copy_into). Content an earlier label
    made an example of another bucket is moved there instead, never copied twice; content that is an
    example of this bucket already is left as it is. Recorded in `corrections` as kind 'library'.
    """
    if bucket in NOT_LABELS or bucket.startswith(NOT_BUCKET_PREFIXES):
        raise HeadmasterError(f"'{bucket}' is not a bucket one can learn from")
    ensure_schema(store)
    folder = ws.heads_dir / head / bucket
    latest = _latest(store, head, hash_)
    if latest and latest[2] != "unlearned" and Path(latest[1]).exists():
        previous, example = latest[0], Path(latest[1])
        if example.parent == folder:
            return Learned(head, bucket, hash_, example, "unchanged", previous)
        target = move_into(example, folder)
        store.forget_files([str(example)])
        _index(store, target, hash_)
        _record(store, head, hash_, bucket, source, target, LIBRARY)
        return Learned(head, bucket, hash_, target, "moved", previous)
    for record in store.files_under(str(folder) + os.sep):  # the user's own example of this content
        if record.hash == hash_ and os.path.exists(record.path):
            return Learned(head, bucket, hash_, Path(record.path), "unchanged")
    target = copy_into(Path(source), folder)
    _index(store, target, hash_)
    _record(store, head, hash_, bucket, source, target, LIBRARY)
    return Learned(head, bucket, hash_, target, "added")


def unlearn_copy(store: Store, head: str, hash_: str, example: Path, source: Path) -> None:
    """Undo learn_copy's 'added': remove the copy it made, only while the library photo it was copied from is
    still there (so no image loses its last copy); HeadmasterError otherwise."""
    ensure_schema(store)
    latest = _latest(store, head, hash_)
    if not latest or latest[2] != LIBRARY or Path(latest[1]) != example or not example.exists():
        raise HeadmasterError(f"{example.name} is not an example copied from a library by the last label")
    if not source.is_file():
        raise HeadmasterError(f"{source} is gone from its library; the example {example.name} stays")
    os.unlink(example)  # our own copy; the photo it came from is still in its library
    fsync_dir(example.parent)
    store.forget_files([str(example)])
    _record(store, head, hash_, latest[0], source, example, "unlearned")


def unlearn(store: Store, ws: Workspace, head: str, file: Path) -> Path:
    """Remove the example a correction added for this file's content; returns where the example was.

    The example is unlinked only while another copy of the image exists (the corrected
    file, or another link); otherwise it is moved back to classified/<head>/<bucket>/.
    """
    ensure_schema(store)
    file = Path(file)
    if not file.exists():
        raise HeadmasterError(f"file not found: {file}")
    hash_ = file_sha256(file)
    latest = _latest(store, head, hash_)
    if not latest or latest[2] == "unlearned" or not Path(latest[1]).exists():
        raise HeadmasterError(f"{file} is not an example that head '{head}' learned from a correction")
    bucket, example = latest[0], Path(latest[1])
    others = os.stat(example).st_nlink > 1 or (file.resolve() != example.resolve())
    if others:
        os.unlink(example)
        fsync_dir(example.parent)
    else:
        move_into(example, ws.classified_dir / head / bucket)
    store.forget_files([str(example)])
    _record(store, head, hash_, bucket, file, example, "unlearned")
    return example


@dataclass(frozen=True)
class CorrectionRow:
    at: str
    kind: str
    bucket: str
    example: str
    source: str


def corrections_log(store: Store, head: str, limit: int = 100) -> list[CorrectionRow]:
    """What the head learned from, newest first."""
    ensure_schema(store)
    rows = store.conn.execute("SELECT at, kind, bucket, example, source FROM corrections WHERE head = ? "
                              "ORDER BY id DESC LIMIT ?", (head, limit))
    return [CorrectionRow(*r) for r in rows]


def correction_counts(store: Store, head: str) -> dict[str, int]:
    """{'corrections': rows learned from user moves, 'confirmed': ..., 'examples': examples in place now}."""
    ensure_schema(store)
    rows = store.conn.execute("SELECT hash, kind, example FROM corrections WHERE head = ? ORDER BY id", (head,))
    latest: dict[str, tuple[str, str]] = {}
    counts = {"corrections": 0, "confirmed": 0, "examples": 0}
    for hash_, kind, example in rows:
        if kind in ("correction", "confirmed"):
            counts["corrections" if kind == "correction" else "confirmed"] += 1
        latest[hash_] = (kind, example)
    counts["examples"] = sum(1 for kind, ex in latest.values() if kind != "unlearned" and os.path.exists(ex))
    return counts


def confirmable(store: Store, ws: Workspace, days: int) -> list[tuple[str, str, Path, str]]:
    """(head, bucket, path, hash) of confident sorts left in place at least `days` days and not learned yet."""
    ensure_schema(store)
    cutoff = datetime.now(timezone.utc) - timedelta(days=days)
    out = []
    rows = store.conn.execute("SELECT head, bucket, destination, hash, at FROM sorts WHERE hash IS NOT NULL "
                              "ORDER BY id").fetchall()
    for head, bucket, destination, hash_, at in rows:
        if bucket in NOT_LABELS:
            continue
        try:
            when = datetime.strptime(at, "%Y-%m-%dT%H:%M:%S%z")
        except ValueError:
            continue
        path = Path(destination)
        if when > cutoff or not path.exists() or _latest(store, head, hash_):
            continue
        if path.parent != ws.classified_dir / head / bucket:
            continue
        out.append((head, bucket, path, hash_))
    if not out:
        return []
    current, _, _ = hash_paths(store, [p for _, _, p, _ in out])
    return [item for item in out if current.get(item[2]) == item[3]]  # only if still the same content


@dataclass(frozen=True)
class UncertainFile:
    path: Path
    bucket: str  # the head's best guess
    score: float
    margin: float  # distance from the decision boundary: smaller is more informative


def rank_uncertain(ctx: Context, head: str, limit: int | None = None) -> list[UncertainFile]:
    """Files in classified/<head>/uncertain/, closest to the decision boundary first (label those first)."""
    from headmaster.heads import cut_margin, decide_paths, load_trained

    trained, model = load_trained(ctx, head)
    folder = ctx.workspace.classified_dir / head / UNCERTAIN
    paths = list_images(folder)[0] if folder.is_dir() else []
    decisions, _ = decide_paths(ctx, trained, model, paths, label=f"Ranking {head}")
    out = [UncertainFile(d.path, trained.guess(d.probabilities), d.score, cut_margin(trained, d.probabilities))
           for d in decisions]
    out.sort(key=lambda u: (u.margin, u.path.name))
    return out[:limit] if limit else out

