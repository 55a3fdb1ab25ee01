"""What hm tag reads and records without a model: a library's photos, and what was written per image and head.

`find_images` lists a library; the `tags`, `tag_sidecars` and `tag_checks` tables say what was
written. No model and no torch here, so hmd's supervisor lists a library and finds, stat-only, which
photos are tagged and which wait (headmaster/daemon/library.py); curation/tagging.py writes the tables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from headmaster import HeadmasterError
from headmaster.store import Store
from headmaster.workspace import is_image_name

SKIP_FOLDERS = frozenset({"@eaDir", "#recycle"})  # NAS thumbnail and trash folders: full of JPEGs that are not photos

SCHEMA = """
CREATE TABLE IF NOT EXISTS tags (
    path TEXT NOT NULL,        -- the image, absolute
    head TEXT NOT NULL,
    hash TEXT NOT NULL,        -- the image's content hash when it was tagged
    model TEXT NOT NULL,
    checkpoint TEXT NOT NULL,  -- the head checkpoint's version (heads.checkpoint_meta.checkpoint_version)
    cut REAL,                  -- the run's --threshold for this head, NULL: the head's own
    bucket TEXT NOT NULL,      -- the decision, or 'uncertain'
    score REAL NOT NULL,
    tag TEXT NOT NULL,         -- what was written: headmaster|clothing|hat, '' for no tag
    at TEXT NOT NULL,
    PRIMARY KEY (path, head)
);
CREATE TABLE IF NOT EXISTS tag_sidecars (
    sidecar TEXT PRIMARY KEY,  -- absolute
    image TEXT NOT NULL,
    kind TEXT NOT NULL,        -- xmp, txt or json
    sha256 TEXT NOT NULL,      -- of the bytes we wrote
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tag_sidecars_image ON tag_sidecars(image);  -- an image's sidecars, when it is gone
CREATE TABLE IF NOT EXISTS tag_checks (
    path TEXT NOT NULL,        -- the image, absolute
    head TEXT NOT NULL,
    hash TEXT NOT NULL,
    checkpoint TEXT NOT NULL,  -- a newer checkpoint than the `tags` row's, whose decision was the same:
    at TEXT NOT NULL,          -- the sidecars were left as they were (hmd's re-tag after a retrain)
    PRIMARY KEY (path, head)
);
"""


@dataclass
class Found:
    images: list[Path] = field(default_factory=list)
    hidden: int = 0  # hidden files and folders skipped
    symlinks: int = 0  # symlinks not followed


def find_images(sources: list[Path], recursive: bool = True, exclude: list[Path] = ()) -> Found:
    """The images under `sources` (files as given; folders walked), sorted, each once.

    Hidden files and folders (a leading dot) and NAS housekeeping folders are skipped; symlinks are
    not followed (a link to a folder above would loop, and a linked photo is tagged where it lives).
    Folders in `exclude` (hmd's workspace inside a library) are not walked.
    """
    found = Found()
    seen: set[Path] = set()
    skip = {os.path.normpath(p) for p in exclude}
    for src in map(Path, sources):
        if src.is_file():
            if not is_image_name(src):
                raise HeadmasterError(f"not an image file headmaster reads: {src}")
            if src not in seen:
                seen.add(src)
                found.images.append(src)
            continue
        if not src.is_dir():
            raise HeadmasterError(f"not found: {src}")
        for folder, dirs, files in os.walk(src, followlinks=False):
            keep = []
            for d in dirs:
                if d.startswith(".") or d in SKIP_FOLDERS:
                    found.hidden += 1
                elif os.path.islink(os.path.join(folder, d)):
                    found.symlinks += 1
                elif skip and os.path.normpath(os.path.join(folder, d)) in skip:
                    continue
                else:
                    keep.append(d)
            dirs[:] = sorted(keep) if recursive else []
            for name in files:
                if name.startswith("."):
                    found.hidden += is_image_name(name[1:] or "x")
                    continue
                if not is_image_name(name):
                    continue
                path = Path(folder, name)
                if path.is_symlink():
                    found.symlinks += 1
                elif path not in seen:
                    seen.add(path)
                    found.images.append(path)
    found.images.sort()
    return found


def ensure_tag_schema(store: Store) -> None:
    store.conn.executescript(SCHEMA)


def previous_records(store: Store, heads: list[str]) -> dict[tuple[str, str], tuple]:
    """(path, head) -> (hash, checkpoint, cut, bucket, tag) as last written."""
    ensure_tag_schema(store)
    marks = ",".join("?" * len(heads))
    rows = store.conn.execute("SELECT path, head, hash, checkpoint, cut, bucket, tag FROM tags "
                              f"WHERE head IN ({marks})", heads)
    return {(r[0], r[1]): tuple(r[2:]) for r in rows}


def written_sidecars(store: Store) -> dict[str, tuple[str, int, int]]:
    """sidecar -> (sha256, size, mtime_ns) as we left it."""
    ensure_tag_schema(store)
    return {r[0]: (r[1], r[2], r[3]) for r in store.conn.execute("SELECT sidecar, sha256, size, mtime_ns FROM "
                                                                   "tag_sidecars")}


def _under(store: Store, sql: str, root: Path) -> list[tuple]:
    prefix = str(root).rstrip(os.sep) + os.sep
    return store.conn.execute(sql + " WHERE path >= ? AND path < ?", (prefix, prefix + "\U0010ffff")).fetchall()


def tagged_images(store: Store, root: Path, stats: dict[str, tuple[int, int]], heads: dict[str, str]) -> set[str]:
    """Of the images under `root` (`stats`: path -> (size, mtime_ns) now), those tagged as they are now.

    Stat-only: an image counts when the file index knows it at this size and mtime, and every head in
    `heads` (name -> its checkpoint's version) tagged that content with that checkpoint, or checked
    it and found the same decision. Reads no image and no sidecar.
    """
    ensure_tag_schema(store)
    index = {r[0]: (r[1], r[2], r[3]) for r in _under(store, "SELECT path, size, mtime_ns, hash FROM files", root)}
    done: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for table in ("tags", "tag_checks"):
        for path, head, hash_, checkpoint in _under(store, f"SELECT path, head, hash, checkpoint FROM {table}", root):
            done.setdefault((path, head), set()).add((hash_, checkpoint))
    out = set()
    for path, st in stats.items():
        known = index.get(path)
        if known is None or known[:2] != st:
            continue
        if all((known[2], created) in done.get((path, head), ()) for head, created in heads.items()):
            out.add(path)
    return out


def forget_gone(store: Store, root: Path, present: set[str]) -> int:
    """Drop the records of images under `root` that are no longer there (`present`: the listing now).

    Returns how many images were forgotten; see `_forget`.
    """
    ensure_tag_schema(store)
    gone = {r[0] for table in ("tags", "tag_checks") for r in _under(store, f"SELECT path FROM {table}", root)}
    return _forget(store, sorted(gone - present))


def forget_tag_records(store: Store, path: Path) -> int:
    """Drop the records of the image `path`, or of every image below it if it was a folder (it left the library)."""
    ensure_tag_schema(store)
    gone = {r[0] for table in ("tags", "tag_checks") for r in
            [*store.conn.execute(f"SELECT path FROM {table} WHERE path = ?", (str(path),)),
             *_under(store, f"SELECT path FROM {table}", path)]}
    return _forget(store, sorted(gone))


def _forget(store: Store, gone: list[str]) -> int:
    """Their decisions (`tags`, `tag_checks`) go; a sidecar's record goes only if the sidecar is gone too (one
    left behind stays ours, so a photo put back is updated, not taken for the user's). Deletes no file."""
    if not gone:
        return 0
    sidecars = [r[0] for image in gone for r in store.conn.execute("SELECT sidecar FROM tag_sidecars WHERE image = ?",
                                                                    (image,)) if not os.path.lexists(r[0])]
    with store.conn:
        store.conn.execute("BEGIN IMMEDIATE")
        store.conn.executemany("DELETE FROM tags WHERE path = ?", [(p,) for p in gone])
        store.conn.executemany("DELETE FROM tag_checks WHERE path = ?", [(p,) for p in gone])
        store.conn.executemany("DELETE FROM tag_sidecars WHERE sidecar = ?", [(s,) for s in sidecars])
    return len(gone)
