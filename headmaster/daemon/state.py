"""What the daemon knows between events: per-head dirty and retrain bookkeeping, counters.

Plain data behind one lock. Observer threads mark heads dirty, the worker
trains and sorts, control threads read a snapshot; nobody here touches files
except `needs_retrain`, which only stats them.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from headmaster import HeadmasterError
from headmaster.heads import read_checkpoint_meta as read_checkpoint  # no torch in the supervisor
from headmaster.workspace import Workspace


@dataclass
class HeadState:
    retrains: int = 0  # since the daemon started
    first_change: float | None = None  # monotonic time of the first change not yet trained on
    next_retrain: float | None = None  # wall-clock time the retrain job is due
    training: bool = False
    corrections: int = 0  # examples learned from user corrections since start
    last_error: str | None = None

    @property
    def pending(self) -> bool:
        return self.first_change is not None or self.next_retrain is not None


@dataclass
class DaemonState:
    started: float = field(default_factory=time.time)
    heads: dict[str, HeadState] = field(default_factory=dict)
    paused: bool = False
    sorted: int = 0  # inbox files placed in a bucket (or uncertain/) since start
    rejected: int = 0  # inbox files moved to _rejected/ since start
    unreadable_examples: int = 0  # files under heads/ that cannot be read as images
    duplicates_resolved: int = 0  # inbox copies removed at start because the file was already sorted
    errors: int = 0  # failed jobs (logged)
    bad_requests: int = 0  # malformed or oversized control requests
    watchdog_stalls: int = 0  # times the systemd watchdog pings stopped because the work did not move
    problems: dict[str, str] = field(default_factory=dict)  # damaged files of our own ('database', 'checkpoint X')
    activity: str = "starting"
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def head(self, name: str) -> HeadState:
        """The bookkeeping of one head (created on first use). Call with the lock held."""
        return self.heads.setdefault(name, HeadState())

    def mark_dirty(self, name: str, debounce: float, max_delay: float) -> float:
        """Record a change to a head; returns the delay (seconds) until its retrain is due.

        Due `debounce` after this change, but never later than `max_delay` after the
        first change since the head was last trained.
        """
        now = time.monotonic()
        with self.lock:
            h = self.head(name)
            if h.first_change is None:
                h.first_change = now
            delay = max(0.0, min(now + debounce, h.first_change + max_delay) - now)
            h.next_retrain = time.time() + delay
            return delay

    def begin_retrain(self, name: str) -> None:
        """The retrain starts: changes from now on start a new debounce window."""
        with self.lock:
            h = self.head(name)
            h.first_change = None
            h.next_retrain = None

    def count(self, attr: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, attr, getattr(self, attr) + n)


@dataclass(frozen=True)
class Freshness:
    retrain: bool
    reason: str


def needs_retrain(ws: Workspace, head: str, model_name: str | None) -> Freshness:
    """Does the head's labelled set differ from what its checkpoint was trained on?

    Compares the checkpoint's `sources` with the images on disk and their mtimes
    with the checkpoint's: stat only, no file is read except the checkpoint.
    """
    labelled = ws.head(head)
    path = ws.checkpoint_path(head)
    try:
        checkpoint_mtime = os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return Freshness(True, "no checkpoint yet")
    try:
        checkpoint = read_checkpoint(path)
    except HeadmasterError as e:
        return Freshness(True, str(e))
    if model_name is not None and checkpoint.get("model") != model_name:
        return Freshness(True, f"trained with model '{checkpoint.get('model')}', active model is '{model_name}'")
    then = {c: set(ps) for c, ps in checkpoint.get("sources", {}).items()}
    now: dict[str, set[str]] = {}
    newest = 0
    for b in labelled.buckets:
        now[b.name] = set()
        for p in b.images:
            now[b.name].add(p.relative_to(ws.heads_dir).as_posix())
            try:
                newest = max(newest, os.stat(p).st_mtime_ns)
            except FileNotFoundError:
                pass
    if set(now) != set(then):
        return Freshness(True, f"buckets changed ({', '.join(sorted(then))} -> {', '.join(sorted(now))})")
    added = sum(len(now[c] - then[c]) for c in now)
    removed = sum(len(then[c] - now[c]) for c in now)
    if added or removed:
        return Freshness(True, f"+{added} / -{removed} images since training")
    if newest > checkpoint_mtime:
        return Freshness(True, "images modified since training")
    return Freshness(False, "labelled set unchanged since training")


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")
