"""Sorting the inbox on the job thread: which files are ready, whether their head can sort, and the log of moves.

The worker decides (`decide`, through Calls.call_per_file: a file that crashes it twice is
rejected); the moves themselves are headmaster/daemon/inbox.py's `sort_files`, here in the
supervisor, which asks for the next window's decisions while it moves the files of this one;
files that settle meanwhile join the next window. Files stay in the inbox while sorting is
paused, while they are still settling, and while their head cannot sort (no head folder, not
trained, trained for another model, a damaged checkpoint); each such wait is said once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from loguru import logger

from headmaster import HeadmasterError
from headmaster.daemon.calls import CRASHED, Calls
from headmaster.daemon.events import Events
from headmaster.daemon.hub import Hub
from headmaster.daemon.inbox import REJECTED, Placed, Verdict, inbox_files, inbox_heads, sort_files
from headmaster.daemon.worker_client import WorkerCrashed
from headmaster.fileops import unique_path

MORE_WINDOWS = 8  # requests one sort_inbox may add for files that settle while it runs


class Sorter:
    def __init__(self, hub: Hub, events: Events, calls: Calls):
        self.hub = hub
        self.events = events
        self.calls = calls
        self._dry_reported: set[tuple[str, int, int]] = set()  # [inbox] dry_run: file versions already logged

    def sort_all(self) -> None:
        for head in inbox_heads(self.hub.inbox_dir):
            if self.hub.stopping.is_set():
                return
            self.sort_inbox(head)

    # -- the heads' checkpoints -----------------------------------------------------------
    def checkpoint_damaged(self, head: str) -> bool:
        """True (and reported once, in the log and in status) when out/<head>.pt exists but cannot be read."""
        summary = self.hub.checkpoints.summary(self.hub.ws.checkpoint_path(head))
        error = summary.get("error") if summary else None
        self.hub.problem(f"checkpoint {head}", error)
        return error is not None

    def set_damaged_checkpoint_aside(self, head: str) -> None:
        """The user asked for a retrain over a damaged checkpoint: keep the damaged file, renamed."""
        path = self.hub.ws.checkpoint_path(head)
        aside = unique_path(path.parent, f"{path.name}.damaged")
        os.rename(path, aside)
        logger.warning("head {}: damaged checkpoint kept as {}; training a new one", head, aside)
        self.hub.problem(f"checkpoint {head}", None)

    def sortable(self, head: str) -> str | None:
        """Why the head cannot sort now (checked without the worker), or None."""
        summary = self.hub.checkpoints.summary(self.hub.ws.checkpoint_path(head))
        if summary is None:
            return f"head '{head}' is not trained yet"
        if self.checkpoint_damaged(head):
            return summary["error"]
        model = self.calls.model()
        if model is None:
            return "no active model"
        if summary["model"] != model.name:
            return (f"head '{head}' was trained with model '{summary['model']}' but the active model is "
                    f"'{model.name}'")
        return None

    # -- sorting --------------------------------------------------------------------------
    def verdicts(self, head: str, paths: list[Path]) -> list[Verdict]:
        """The worker's decisions for `paths`; a file that crashes the worker twice is rejected (and remembered
        as unusable by `placed`, on the job thread: this runs on sort_files' helper thread and uses no database)."""
        results, crashed = self.calls.call_per_file("decide", paths, remember=False, head=head)
        out = [Verdict(Path(p), bucket, hash_, score) for r in results for p, bucket, hash_, score in r["decisions"]]
        out += [Verdict(Path(p), REJECTED, None, None, reason) for r in results for p, reason in r["unusable"]]
        out += [Verdict(p, REJECTED, None, None, CRASHED) for p in crashed]
        return out

    def ready_files(self, folder: Path, settled: set[Path] = frozenset(), taken: set[Path] = frozenset()
                    ) -> list[Path]:
        """The files in `folder` that may be sorted now, less `taken`.

        Files the settler has not seen yet (present at start, or their events still on the way)
        must look old enough; `settled` ones are known complete (even with an mtime in the future).
        In a dry run, a version of a file already reported is left out.
        """
        hub = self.hub
        now = time.time()
        ready: list[Path] = []
        for f in inbox_files(folder):
            if f in taken or hub.settler.is_pending(f):
                continue
            if f in settled or hub.settler.was_settled(f):  # settled in this check, or in one since queued
                ready.append(f)
                continue
            try:
                young = now - os.stat(f).st_mtime < hub.config.daemon.settle_seconds
            except FileNotFoundError:
                continue
            if young:  # seen before its events arrived: let it settle first
                self.events.arm_settle(hub.settler.touch(f))
            else:
                ready.append(f)
        if hub.config.inbox.dry_run:  # files stay in the inbox: report each version of a file once
            ready = [f for f in ready if self.dry_key(f) not in self._dry_reported]
        return ready

    def sort_inbox(self, head: str, settled: set[Path] = frozenset()) -> None:
        """Sort every settled file in <inbox>/<head>/; files stay when paused or the head cannot sort yet.

        Files that settle while the first ones are decided join the next request (at most MORE_WINDOWS
        requests in all: then the job thread takes its other tasks; the rest come with their own).
        """
        hub = self.hub
        if hub.state.paused or hub.stopping.is_set():
            return
        folder = hub.inbox_dir / head
        ready = self.ready_files(folder, settled)
        if not ready:
            return
        if head not in hub.ws.head_names():
            hub.tell_once(f"nohead:{head}", f"inbox/{head}: no head '{head}' in {hub.ws.heads_dir}; "
                                            f"{len(ready)} file(s) wait")
            return
        if (why := self.sortable(head)) is not None:
            hub.tell_once(f"wait:{head}:{why}", f"inbox/{head}: {len(ready)} file(s) wait: {why}")
            return
        taken = set(ready)
        chunk = hub.config.daemon.max_batch_images
        windows = [0]

        def more() -> list[Path]:
            """Files that settled since the last look, for the next request (on the job thread)."""
            windows[0] += 1
            if windows[0] > MORE_WINDOWS or hub.state.paused:
                return []
            new = self.ready_files(folder, settled, taken)[:chunk]
            taken.update(new)
            if new:
                logger.debug("inbox/{}: {} more file(s) settled meanwhile", head, len(new))
            return new

        hub.set_activity(f"sorting {head}")
        logger.debug("inbox/{}: {} file(s) ready to sort", head, len(ready))
        try:
            result = sort_files(hub.store, head, lambda paths: self.verdicts(head, paths), ready,
                                hub.classified_dir / head, should_stop=hub.stopping.is_set,
                                on_placed=self.placed, dry_run=hub.config.inbox.dry_run, chunk=chunk, more=more)
        except WorkerCrashed:
            raise
        except HeadmasterError as e:  # the worker cannot use the head (e.g. its checkpoint will not load)
            hub.tell_once(f"wait:{head}:{e}", f"inbox/{head}: files wait: {e}")
            return
        logger.debug("inbox/{}: {} file(s) placed: {:.2f}s waiting for decisions, {:.2f}s moving", head,
                     len(result.placed) + len(result.rejected), result.decide_seconds, result.place_seconds)
        if hub.config.inbox.dry_run:
            self._dry_reported.update(self.dry_key(p.source) for p in result.placed + result.rejected)

    @staticmethod
    def dry_key(path: Path) -> tuple[str, int, int]:
        try:
            st = os.stat(path)
        except OSError:
            return (str(path), -1, -1)
        return (str(path), st.st_size, st.st_mtime_ns)

    def placed(self, p: Placed) -> None:
        hub = self.hub
        hub.heartbeat.beat()  # each file placed is progress for the watchdog
        where = p.destination.relative_to(hub.classified_dir)
        dry_run = hub.config.inbox.dry_run
        if p.reason == CRASHED:  # its content (now in _rejected/, unless a dry run) is never decoded again
            self.calls.remember_crashes([p.source if dry_run else p.destination])
        if dry_run:
            score = "" if p.score is None else f" ({p.score:.2f})"
            logger.info("dry run: would move {} -> {}{}{}", p.source.name, where, score,
                        f": {p.reason}" if p.reason else "")
            return
        if p.bucket == REJECTED:
            logger.warning("rejected {} -> {}: {}", p.source.name, where, p.reason)
        else:
            logger.info("sorted {} -> {} ({:.2f})", p.source.name, where, p.score)
        with hub.state.lock:
            if p.bucket == REJECTED:
                hub.state.rejected += 1
            else:
                hub.state.sorted += 1
