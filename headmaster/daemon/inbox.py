"""The inbox: files dropped into `<inbox>/<head>/` sorted into `classified/<head>/<bucket>/`.

Decisions come from the worker process (the same code as `hm classify`, `decide_paths`),
as plain Verdicts; this module, in the supervisor, only moves files. Files move
with `fileops.move_into`, which links (or copies and fsyncs) before it unlinks the
source, so at every instant the file exists at least once. `resolve_leftovers`
removes the second copy a crash can leave, so after a restart every file
exists exactly once.
"""

from __future__ import annotations

import os
import re
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from headmaster.daemon.watcher import is_candidate_name
from headmaster.embedding import file_sha256
from headmaster.fileops import move_into, remove_stale_temps, unique_path
from headmaster.store import FileRecord, Store

REJECTED = "_rejected"  # classified/<head>/_rejected/: files that cannot be read as images
CHUNK = 16  # files decided and moved per step unless the caller says; the stop flag is checked between steps


@dataclass(frozen=True)
class Verdict:
    """Where one file goes, as the worker decided: a bucket (or 'uncertain') with hash and score, or REJECTED."""

    path: Path
    bucket: str
    hash: str | None = None
    score: float | None = None
    reason: str = ""  # why it is rejected


Decide = Callable[[list[Path]], list[Verdict]]


@dataclass
class Placed:
    source: Path
    destination: Path
    bucket: str
    score: float | None
    reason: str = ""  # why it was rejected


@dataclass
class SortResult:
    placed: list[Placed] = field(default_factory=list)
    rejected: list[Placed] = field(default_factory=list)
    vanished: int = 0
    decide_seconds: float = 0.0  # waiting for `decide` (the worker)
    place_seconds: float = 0.0  # moving the files and logging the sorts


def inbox_files(folder: Path) -> list[Path]:
    """Candidate files directly inside one head's inbox folder, sorted (hidden and partial names skipped)."""
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(Path(e.path) for e in entries if is_candidate_name(e.name) and e.is_file(follow_symlinks=False))


def inbox_heads(inbox_dir: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(inbox_dir) if e.is_dir() and not e.name.startswith("."))
    except FileNotFoundError:
        return []


def _reindex(store: Store, source: Path, destination: Path, hash_: str | None) -> None:
    """Keep the file index true after a move: the old path is gone, the new one has the same content."""
    store.forget_files([str(source)])
    if hash_ is None:
        return
    try:
        st = os.stat(destination)
    except OSError:
        return
    store.put_file_records([FileRecord(str(destination), st.st_size, st.st_mtime_ns, st.st_ino, hash_)])


def sort_files(store: Store, head: str, decide: Decide, paths: list[Path], dest_root: Path,
               should_stop: Callable[[], bool] = lambda: False,
               on_placed: Callable[[Placed], None] = lambda p: None, dry_run: bool = False,
               chunk: int = CHUNK, more: Callable[[], list[Path]] | None = None) -> SortResult:
    """Decide `chunk` files at a time and move each into dest_root/<bucket>/ (or uncertain/, or _rejected/),
    logging every sort.

    `decide` runs on a helper thread, one window at a time, the next window's while this one's files
    move (the worker embeds while the supervisor moves); it must not use `store`. Its errors come
    out of sort_files when their window's turn comes; the files of the windows not placed stay put.
    When `paths` run out, `more()` (if given; called on the caller's thread) may give further files
    (that settled meanwhile): they are decided next, until it gives none.

    Never deletes a file: a file leaves the inbox only once its copy is in place.
    Stops between files when `should_stop()` turns true; unsorted files stay put.
    `on_placed` hears about each file as soon as it is in place (sorted or rejected).
    With `dry_run`, nothing moves and no sort is logged: each Placed names where the file would go.
    """
    result = SortResult()

    def place(path: Path, bucket: str, hash_: str | None, score: float | None) -> Path | None:
        """Move one file into dest_root/<bucket>/ and log it (where it would go, in a dry run); None if gone."""
        if not os.path.lexists(path):
            result.vanished += 1
            return None
        if dry_run:
            return unique_path(dest_root / bucket, path.name)
        target = move_into(path, dest_root / bucket)
        store.log_sort(head, str(path), str(target), hash_, bucket, score)
        _reindex(store, path, target, hash_)
        return target

    size = max(1, chunk)
    waiting = list(paths)

    def next_window() -> list[Path]:
        nonlocal waiting
        if not waiting and more is not None:
            waiting = list(more())
        window, waiting = waiting[:size], waiting[size:]
        return window

    first = next_window()
    if not first or should_stop():
        return result
    ahead = ThreadPoolExecutor(1, thread_name_prefix="hmd-decide")  # the next window's decisions, during the moves
    pending: Future | None = ahead.submit(decide, first)
    try:
        while pending is not None:
            asked = time.perf_counter()
            verdicts, pending = pending.result(), None
            decided = time.perf_counter()
            result.decide_seconds += decided - asked
            if should_stop():
                break
            if window := next_window():
                pending = ahead.submit(decide, window)
            try:
                for v in verdicts:
                    if should_stop():
                        return result
                    if (target := place(v.path, v.bucket, v.hash, v.score)) is not None:
                        placed = Placed(v.path, target, v.bucket, v.score, v.reason)
                        (result.rejected if v.bucket == REJECTED else result.placed).append(placed)
                        on_placed(placed)
            finally:
                result.place_seconds += time.perf_counter() - decided
    finally:
        if pending is not None:  # stopped or failed with a request in flight: it ends (unused), its files stay put
            pending.cancel()
        ahead.shutdown(wait=True)
    return result


def _same_content(a: Path, b: Path) -> bool:
    try:
        return os.path.getsize(a) == os.path.getsize(b) and file_sha256(a) == file_sha256(b)
    except OSError:
        return False


def _clash_names(name: str) -> re.Pattern:
    """`stem.ext` and the names unique_path gives it on a clash: `stem_1.ext`, `stem_2.ext`, ..."""
    stem, suffix = os.path.splitext(name)
    return re.compile(re.escape(stem) + r"(_\d+)?" + re.escape(suffix) + r"\Z")


@dataclass
class Leftovers:
    temps: int = 0  # our own .hm-tmp-* files removed
    duplicates: list[tuple[Path, Path]] = field(default_factory=list)  # (inbox copy removed, sorted copy kept)


def resolve_leftovers(store: Store, inbox_dir: Path, classified_dir: Path) -> Leftovers:
    """Undo what a crash in the middle of a move can leave behind; run before anything is sorted.

    An inbox file that is also already in classified/<head>/ (the same inode: the
    link was made but the source not yet unlinked; or identical content under the
    destination the sort log recorded, or under the same name or a clash name of
    it: a cross-filesystem copy) loses its inbox copy. The sorted copy is kept,
    so no content is ever lost.
    """
    out = Leftovers(remove_stale_temps(classified_dir) + remove_stale_temps(inbox_dir))
    for head in inbox_heads(inbox_dir):
        files = inbox_files(inbox_dir / head)
        dest_root = classified_dir / head
        if not files or not dest_root.is_dir():
            continue
        inodes: dict[tuple[int, int], Path] = {}
        by_size: dict[int, list[Path]] = defaultdict(list)
        for bucket in os.scandir(dest_root):
            if not bucket.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(bucket.path):
                if entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    inodes[(st.st_dev, st.st_ino)] = Path(entry.path)
                    by_size[st.st_size].append(Path(entry.path))
        for f in files:
            try:
                st = os.stat(f, follow_symlinks=False)
            except FileNotFoundError:
                continue
            twin = inodes.get((st.st_dev, st.st_ino))
            if twin is None:
                logged = [Path(d) for d in store.sort_destinations(str(f))]
                pattern = _clash_names(f.name)
                named = [p for p in by_size.get(st.st_size, []) if pattern.match(p.name)]
                for candidate in dict.fromkeys(logged + named):
                    if candidate.exists() and _same_content(f, candidate):
                        twin = candidate
                        break
            if twin is not None:
                os.unlink(f)  # its content is safe in `twin`
                store.forget_files([str(f)])
                out.duplicates.append((f, twin))
    return out
