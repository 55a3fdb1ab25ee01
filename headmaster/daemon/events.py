"""Where the watcher's events go (watchdog's observer thread), and the timers they arm (APScheduler's thread).

`Events` is the WorkspaceHandler's sink (headmaster/daemon/watcher.py): a changed example
marks its head dirty, which (re)arms that head's debounced retrain; a file still arriving
arms a settle check; what needs work becomes a Task on the job queue. No I/O beyond stat,
and a timer only queues work: the job thread does it. A new inbox file for a trained head also
wakes a sleeping worker at once (WorkerClient.prestart): it loads the model while the file settles.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from headmaster.daemon.hub import Hub, Task
from headmaster.daemon.inbox import inbox_files


class Events:
    def __init__(self, hub: Hub):
        self.hub = hub
        self._settle_lock = threading.Lock()
        self._settle_armed: float | None = None

    # -- the watcher's sink (observer thread) ----------------------------------------------
    def example_changed(self, head: str, path: Path, writing: bool) -> None:
        self.arm_settle(self.hub.settler.touch(path, writing))
        self.mark_dirty(head)

    def example_closed(self, head: str, path: Path) -> None:
        self.arm_settle(self.hub.settler.closed(path))
        self.mark_dirty(head)

    def example_removed(self, head: str, path: Path) -> None:
        self.hub.settler.forget(path)
        self.hub.tasks.put(Task("forget", head, (path,)))
        self.mark_dirty(head)

    def head_changed(self, head: str, folder: Path | None) -> None:
        if head.startswith("."):
            return
        if folder is None:
            self.hub.settler.forget_under(self.hub.ws.heads_dir / head)
        self.mark_dirty(head)

    def inbox_changed(self, head: str, path: Path, writing: bool) -> None:
        self.arm_settle(self.hub.settler.touch(path, writing))
        self.wake_worker(head)

    def inbox_closed(self, head: str, path: Path) -> None:
        self.arm_settle(self.hub.settler.closed(path))
        self.wake_worker(head)

    def wake_worker(self, head: str) -> None:
        """Files for `head` are arriving: have the worker load the model and the head while they settle
        (nothing is read before a file has settled). Not while paused, nor for a head without a checkpoint."""
        hub = self.hub
        worker = hub.worker
        if worker.pid is not None and worker.loaded_since is not None:  # the common case in a burst: ready
            return
        if hub.stopping.is_set() or hub.state.paused or not hub.ws.checkpoint_path(head).is_file():
            return
        worker.prestart(head=head)

    def inbox_removed(self, path: Path) -> None:
        self.hub.settler.forget(path)
        self.hub.settler.forget_under(path)

    def inbox_folder(self, head: str, folder: Path) -> None:
        files = inbox_files(folder)
        for f in files:
            self.arm_settle(self.hub.settler.touch(f))
        if files:
            self.wake_worker(head)

    def classified_changed(self, head: str, bucket: str, path: Path, writing: bool) -> None:
        self.arm_settle(self.hub.settler.touch(path, writing))

    def classified_closed(self, head: str, bucket: str, path: Path) -> None:
        self.arm_settle(self.hub.settler.closed(path))

    def library_changed(self, path: Path, writing: bool) -> None:
        self.arm_settle(self.hub.settler.touch(path, writing))

    def library_closed(self, path: Path) -> None:
        self.arm_settle(self.hub.settler.closed(path))

    def library_removed(self, path: Path) -> None:
        self.hub.settler.forget(path)
        self.hub.settler.forget_under(path)
        self.hub.tasks.put(Task("library_gone", paths=(path,)))

    def library_folder(self, root: Path) -> None:
        self.hub.tasks.put(Task("library", paths=(root,)))

    def checkpoint_written(self, head: str) -> None:
        self.hub.tasks.put(Task("sort", head))  # e.g. `hm train` beside us: waiting inbox files can go now

    # -- timers (scheduler thread) -------------------------------------------------------
    def mark_dirty(self, head: str) -> None:
        hub = self.hub
        if hub.stopping.is_set():
            return
        delay = hub.state.mark_dirty(head, hub.config.daemon.debounce_seconds, hub.config.daemon.max_delay_seconds)
        hub.scheduler.add_job(hub.tasks.put, "date", args=[Task("retrain", head)], id=f"retrain:{head}",
                              replace_existing=True, run_date=_after(delay))

    def arm_settle(self, due: float) -> None:
        """Make sure a settle check runs no later than monotonic time `due`."""
        if self.hub.stopping.is_set():
            return
        with self._settle_lock:
            if self._settle_armed is not None and self._settle_armed <= due:
                return
            self._settle_armed = due
            self.hub.scheduler.add_job(self.settle_check, "date", id="settle", replace_existing=True,
                                       run_date=_after(due - time.monotonic()))

    def settle_check(self) -> None:
        with self._settle_lock:
            self._settle_armed = None
        settled, next_due = self.hub.settler.check()
        if settled:
            self.hub.tasks.put(Task("settled", paths=tuple(settled)))
        if next_due is not None:
            self.arm_settle(next_due)


def _after(seconds: float) -> datetime:
    return datetime.now(timezone.utc) + timedelta(seconds=max(0.0, seconds))
