"""File events: which area of the workspace changed, and when a new file is complete.

The watchdog handler only classifies paths and calls back; it never reads a file.
The Settler decides when a file has stopped changing: its size and mtime are
unchanged for `settle_seconds` and, where the platform reports it (inotify),
the writer has closed it, so a file written slowly is never taken half-written.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from headmaster.fileops import TEMP_PREFIX, size_and_mtime
from headmaster.workspace import NOT_BUCKET_PREFIXES, is_image_name

# Names browsers and sync tools give files while they are still arriving.
PARTIAL_SUFFIXES = (".part", ".partial", ".crdownload", ".download", ".tmp", ".swp")
# watchdog's threads block on their queues with this timeout; events still arrive at once,
# the timeout only bounds how often an idle daemon wakes up (and nobody joins these threads)
OBSERVER_WAKEUP_S = 30.0
# Events we act on: opens and read-only closes are noise (our own reads cause them).
EVENTS = [FileCreatedEvent, FileModifiedEvent, FileAttribEvent, FileClosedEvent, FileDeletedEvent, FileMovedEvent,
          DirCreatedEvent, DirDeletedEvent, DirMovedEvent]


def is_candidate_name(name: str) -> bool:
    """A visible, finished-looking file name (not ours, not a download in progress)."""
    return not name.startswith(".") and not name.startswith(TEMP_PREFIX) and not name.lower().endswith(
        PARTIAL_SUFFIXES)


@dataclass
class _Pending:
    signature: tuple[int, int] | None  # (size, mtime_ns)
    since: float  # monotonic time the signature last changed
    writing: bool  # written through an open descriptor that is not closed yet
    closed: bool = False  # its writer closed it (IN_CLOSE_WRITE) and it has not changed since


def _touched_only(p: _Pending, sig: tuple[int, int] | None) -> bool:
    """Still closed: only the mtime moved since the close, as when a copy (cp -p, a file manager, rsync) sets
    the original's time after writing; new bytes (another size) mean a writer is at it again."""
    return p.closed and sig is not None and p.signature is not None and sig[0] == p.signature[0]



SETTLED_MEMORY = 100_000  # settled files remembered (a path and two numbers each)
CLOSED_SETTLE_S = 0.25  # a file its writer closed is done once it stays unchanged this long (or settle_seconds, if less)


class Settler:
    """Files that changed recently, until each one has been still for `settle_seconds`.

    Where the kernel reports closes (inotify), a file whose writer closed it and that stayed unchanged
    for CLOSED_SETTLE_S is done sooner: the close says the copy is finished, the short wait catches a
    writer that opens it again. A file that arrives without a close (moved in, or on another system)
    waits the whole `settle_seconds`.
    """

    def __init__(self, settle_seconds: float, track_close: bool):
        self.settle_seconds = settle_seconds
        self.track_close = track_close  # only inotify tells us when a writer closes a file
        self._pending: dict[Path, _Pending] = {}
        self._settled: dict[Path, tuple[int, int]] = {}  # settled files -> their signature then (until they go)
        self._lock = threading.Lock()

    @property
    def stale_writer_seconds(self) -> float:
        """Give up waiting for a close after this long without change (a writer that hangs)."""
        return max(60.0, 10 * self.settle_seconds)

    def _quiet(self, p: _Pending) -> float:
        """How long `p` must stay unchanged once nothing writes it."""
        return min(self.settle_seconds, CLOSED_SETTLE_S) if p.closed and self.track_close else self.settle_seconds

    def touch(self, path: Path, writing: bool = False) -> float:
        """Note a change to `path`; returns the monotonic time it may be settled at the earliest."""
        now = time.monotonic()
        sig = size_and_mtime(path)
        with self._lock:
            p = self._pending.get(path)
            if p is None or p.signature != sig:
                p = _Pending(sig, now, (p.writing if p else False), p is not None and _touched_only(p, sig))
                self._pending[path] = p
            if writing and self.track_close:
                p.writing, p.closed = True, False
            return p.since + self._quiet(p)

    def closed(self, path: Path) -> float:
        """The writer closed `path` (IN_CLOSE_WRITE)."""
        due = self.touch(path)
        with self._lock:
            p = self._pending.get(path)
            if p is None:  # forgotten meanwhile (removed)
                return due
            p.writing, p.closed = False, True
            return p.since + self._quiet(p)

    def forget(self, path: Path) -> None:
        with self._lock:
            self._pending.pop(path, None)
            self._settled.pop(path, None)

    def forget_under(self, folder: Path) -> None:
        prefix = str(folder) + os.sep
        with self._lock:
            for p in [p for p in self._pending if str(p).startswith(prefix)]:
                del self._pending[p]
            for p in [p for p in self._settled if str(p).startswith(prefix)]:
                del self._settled[p]

    def was_settled(self, path: Path) -> bool:
        """`path` settled (in any check so far) and has not changed since: a job that finds it need not wait."""
        with self._lock:
            sig = self._settled.get(path)
        return sig is not None and sig == size_and_mtime(path)

    def is_pending(self, path: Path) -> bool:
        with self._lock:
            return path in self._pending

    def pending_under(self, folder: Path) -> int:
        prefix = str(folder) + os.sep
        with self._lock:
            return sum(1 for p in self._pending if str(p).startswith(prefix))

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def check(self) -> tuple[list[Path], float | None]:
        """(files settled now, monotonic time of the next check or None when nothing is pending)."""
        now = time.monotonic()
        settled: list[Path] = []
        next_due: float | None = None
        with self._lock:
            for path, p in list(self._pending.items()):
                sig = size_and_mtime(path)
                if sig is None:  # vanished (moved away or deleted)
                    del self._pending[path]
                    continue
                if sig != p.signature:
                    p.signature, p.since, p.closed = sig, now, _touched_only(p, sig)
                still = now - p.since
                # an empty or still-open file needs a longer silence before we believe it is done
                waiting = p.writing or sig[0] == 0
                limit = self.stale_writer_seconds if waiting else self._quiet(p)
                if still >= limit:
                    settled.append(path)
                    del self._pending[path]
                    self._settled[path] = sig
                    if len(self._settled) > SETTLED_MEMORY:  # files that left without an event: forget the oldest
                        del self._settled[next(iter(self._settled))]
                else:
                    due = p.since + limit
                    next_due = due if next_due is None else min(next_due, due)
        return settled, next_due


class Sink(Protocol):
    """What the handler reports to (the Daemon's Events, headmaster/daemon/events.py)."""

    def example_changed(self, head: str, path: Path, writing: bool) -> None: ...
    def example_closed(self, head: str, path: Path) -> None: ...
    def example_removed(self, head: str, path: Path) -> None: ...
    def head_changed(self, head: str, folder: Path | None) -> None: ...
    def inbox_changed(self, head: str, path: Path, writing: bool) -> None: ...
    def inbox_closed(self, head: str, path: Path) -> None: ...
    def inbox_removed(self, path: Path) -> None: ...
    def inbox_folder(self, head: str, folder: Path) -> None: ...
    def checkpoint_written(self, head: str) -> None: ...
    def classified_changed(self, head: str, bucket: str, path: Path, writing: bool) -> None: ...
    def classified_closed(self, head: str, bucket: str, path: Path) -> None: ...
    def library_changed(self, path: Path, writing: bool) -> None: ...
    def library_closed(self, path: Path) -> None: ...
    def library_removed(self, path: Path) -> None: ...
    def library_folder(self, root: Path) -> None: ...


def _parts(path: Path, root: Path) -> tuple[str, ...] | None:
    try:
        return path.relative_to(root).parts
    except ValueError:
        return None


def _is_example(parts: tuple[str, ...]) -> bool:
    """heads/<head>/<bucket>/<image>, where <bucket> is a bucket (not _excluded/ or another _ or . folder)."""
    return len(parts) == 3 and not parts[1].startswith(NOT_BUCKET_PREFIXES) and is_image_name(parts[2])


class WorkspaceHandler(FileSystemEventHandler):
    """Sorts raw watchdog events into heads/, inbox/ and out/ changes, and those under a [[library]] root."""

    def __init__(self, heads_dir: Path, inbox_dir: Path, out_dir: Path, sink: Sink,
                 on_error: Callable[[Exception], None] | None = None, classified_dir: Path | None = None,
                 libraries: list[Path] = ()):
        self.heads_dir, self.inbox_dir, self.out_dir, self.sink = heads_dir, inbox_dir, out_dir, sink
        self.classified_dir = classified_dir  # watched only when learning from corrections
        self.libraries = list(libraries)  # photo library roots (headmaster/daemon/library.py)
        self.on_error = on_error

    def dispatch(self, event: FileSystemEvent) -> None:
        try:  # an exception here would kill the observer thread: log it and carry on
            self._dispatch(event)
        except Exception as e:
            if self.on_error:
                self.on_error(e)

    def _dispatch(self, event: FileSystemEvent) -> None:
        src = Path(os.fsdecode(event.src_path))
        if isinstance(event, (FileMovedEvent, DirMovedEvent)):
            self._gone(src, event.is_directory)
            self._arrived(Path(os.fsdecode(event.dest_path)), event.is_directory, writing=False)
        elif isinstance(event, (FileDeletedEvent, DirDeletedEvent)):
            self._gone(src, event.is_directory)
        elif isinstance(event, FileClosedEvent):
            self._closed(src)
        elif isinstance(event, (FileCreatedEvent, DirCreatedEvent, FileAttribEvent)):
            self._arrived(src, event.is_directory, writing=False)
        elif isinstance(event, FileModifiedEvent):
            self._arrived(src, False, writing=True)

    def _arrived(self, path: Path, is_dir: bool, writing: bool) -> None:
        if (parts := _parts(path, self.heads_dir)) is not None:
            if is_dir:
                if len(parts) <= 2:
                    self.sink.head_changed(parts[0], path)
            elif _is_example(parts):
                self.sink.example_changed(parts[0], path, writing)
        elif (parts := _parts(path, self.inbox_dir)) is not None:
            if is_dir and len(parts) == 1 and not parts[0].startswith("."):
                self.sink.inbox_folder(parts[0], path)
            elif not is_dir and len(parts) == 2 and not parts[0].startswith(".") and is_candidate_name(parts[1]):
                self.sink.inbox_changed(parts[0], path, writing)
        elif (parts := self._correction(path, is_dir)) is not None:
            self.sink.classified_changed(parts[0], parts[1], path, writing)
        elif (parts := _parts(path, self.out_dir)) is not None:
            if not is_dir and len(parts) == 1 and parts[0].endswith(".pt") and not parts[0].startswith("."):
                self.sink.checkpoint_written(parts[0][:-3])
        elif (root := self._library(path)) is not None:
            if is_dir:
                self.sink.library_folder(root)  # a folder moved in or made: list the library again
            elif _is_photo(path):
                self.sink.library_changed(path, writing)

    def _closed(self, path: Path) -> None:
        if (parts := _parts(path, self.heads_dir)) is not None:
            if _is_example(parts):
                self.sink.example_closed(parts[0], path)
        elif (parts := _parts(path, self.inbox_dir)) is not None:
            if len(parts) == 2 and is_candidate_name(parts[1]):
                self.sink.inbox_closed(parts[0], path)
        elif (parts := self._correction(path, False)) is not None:
            self.sink.classified_closed(parts[0], parts[1], path)
        elif self._library(path) is not None and _is_photo(path):
            self.sink.library_closed(path)

    def _correction(self, path: Path, is_dir: bool) -> tuple[str, ...] | None:
        """(head, bucket, name) for an image placed in classified/<head>/<bucket>/, else None."""
        if self.classified_dir is None or is_dir:
            return None
        parts = _parts(path, self.classified_dir)
        if parts is None or len(parts) != 3 or parts[0].startswith(".") or parts[1].startswith(("_", ".")) \
                or parts[1] == "uncertain" or not is_image_name(parts[2]):
            return None
        return parts

    def _gone(self, path: Path, is_dir: bool) -> None:
        if (parts := _parts(path, self.heads_dir)) is not None:
            if is_dir and len(parts) <= 2:
                self.sink.head_changed(parts[0], None)
            elif _is_example(parts):
                self.sink.example_removed(parts[0], path)
        elif (parts := _parts(path, self.inbox_dir)) is not None and len(parts) >= 1:
            self.sink.inbox_removed(path)
        elif self._library(path) is not None and (is_dir or _is_photo(path)):
            self.sink.library_removed(path)

    def _library(self, path: Path) -> Path | None:
        """The library root `path` is under (or is), else None."""
        for root in self.libraries:
            if path == root or root in path.parents:
                return root
        return None


def _is_photo(path: Path) -> bool:
    return is_image_name(path) and is_candidate_name(path.name)


def reports_closes() -> bool:
    """Only the inotify backend (Linux) tells us when a writer closes a file."""
    return Observer.__name__ == "InotifyObserver"


def start_observer(handler: WorkspaceHandler, folders: list[Path]) -> Observer:
    """Watch every folder recursively, on one observer thread (no polling on Linux or macOS)."""
    observer = Observer(timeout=OBSERVER_WAKEUP_S)
    for folder in folders:
        observer.schedule(handler, str(folder), recursive=True, event_filter=EVENTS)
    observer.daemon = True
    observer.start()
    return observer
