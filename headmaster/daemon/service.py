"""The Daemon: watches the workspace, embeds, retrains on a debounce and sorts the inbox.

Threads and who does what:
- watchdog's observer thread classifies events and marks heads dirty (no I/O beyond stat);
- APScheduler's thread runs timers only: settle checks, debounced retrains, watchdog pings;
  each timer just queues work;
- one worker thread does all real work in order (embed, train, sort), so the model
  and the database connection have a single user and a file is never sorted twice;
- control threads answer the socket from a state snapshot.
Nothing polls: every thread blocks until an event, a timer or a request wakes it.
"""

from __future__ import annotations

import fcntl
import os
import queue
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from concurrent.futures import Future
from typing import Any, Callable

import sdnotify
from apscheduler.schedulers.background import BackgroundScheduler
from loguru import logger

from headmaster.config import Config, load_config
from headmaster.context import Context, EmbedOptions
from headmaster.daemon.control import ControlServer
from headmaster.daemon.inbox import REJECTED, Placed, inbox_files, inbox_heads, resolve_leftovers, sort_files
from headmaster.daemon.logs import setup_logging
from headmaster.daemon.state import CheckpointCache, DaemonState, head_fields, iso, needs_retrain
from headmaster.daemon.watcher import Settler, WorkspaceHandler, reports_closes, start_observer
from headmaster.errors import HeadmasterError
from headmaster.heads import TrainConfig, TrainedHead
from headmaster.learning import (Learned, confirmable, correction_counts, ensure_schema, is_correction, learn,
                                 rank_uncertain)
from headmaster.pipeline import hash_paths
from headmaster.pipeline import embed_paths
from headmaster.sorting import load_trained
from headmaster.store import Model, Store
from headmaster.heap import release_freed_memory
from headmaster.training import train_one
from headmaster.workspace import Workspace

STOP_GRACE_S = 8.0  # systemd's stop timeout is longer; we promise 10 s
EMBED_CHUNK = 64  # images embedded per step at start-up; the stop flag is checked between steps
COMMANDS = ("status", "retrain", "rescan", "pause", "resume", "reload", "uncertain", "ping")
CALL_TIMEOUT_S = 120.0  # how long a control request waits for the worker


@dataclass(frozen=True)
class Task:
    kind: str  # startup | settled | retrain | sort | forget | rescan | confirm | call
    head: str | None = None
    paths: tuple[Path, ...] = ()
    force: bool = False
    call: Callable[[], Any] | None = None  # kind 'call': run on the worker, result into `future`
    future: Future | None = None


_STOP = Task("stop")


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.ws = Workspace(config.workspace_root)
        self.inbox_dir = config.inbox_dir
        self._dry_reported: set[tuple[str, int, int]] = set()  # [inbox] dry_run: file versions already logged
        self.classified_dir = self.ws.classified_dir
        self.socket_path = config.socket_path
        self.state = DaemonState()
        self.settler = Settler(config.daemon.settle_seconds, reports_closes())
        self.checkpoints = CheckpointCache()
        self.tasks: queue.Queue[Task] = queue.Queue()
        self.scheduler = BackgroundScheduler(
            timezone=timezone.utc,
            job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 1})
        self.notifier = sdnotify.SystemdNotifier()
        self.ctx: Context | None = None
        self.server: ControlServer | None = None
        self.observer = None
        self.worker: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._stop_asked = False
        self._reload_asked = False
        self._settle_lock = threading.Lock()
        self._settle_armed: float | None = None
        self._trained: dict[str, tuple[tuple[int, int], TrainedHead, Model]] = {}
        self._told: set[str] = set()  # messages logged once until the situation changes
        self._lock_fd: int | None = None
        self.web = None  # the review page's server (headmaster.web.server.WebServer), when [web] enabled
        self.review = None
        self.web_error: str | None = None

    # -- life cycle -------------------------------------------------------------------
    def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, stop; returns the exit status."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._reload_asked:
                self._reload_asked = False
                try:
                    self.reload()
                except HeadmasterError as e:
                    logger.error("reload failed, keeping the old config: {}", e)
            if self._stop_asked:
                break
        self.stop()
        return 0

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGHUP:
            self._reload_asked = True
        else:
            self._stop_asked = True
        self._wake.set()

    def start(self) -> None:
        for folder in (self.ws.heads_dir, self.ws.out_dir, self.classified_dir, self.inbox_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        self.ctx = Context.open(str(self.ws.root), EmbedOptions(device=self.config.daemon.device or None,
                                                                 progress=False,
                                                                 backend=self.config.embedding.backend),
                                notify=logger.info)
        self.server = ControlServer(self.socket_path, self.handle_request,
                                    on_bad_request=lambda: self.state.count("bad_requests"))
        self.server.start()
        self.scheduler.start()
        self._start_watchdog_pings()
        learning = self.config.learning.from_corrections
        handler = WorkspaceHandler(self.ws.heads_dir, self.inbox_dir, self.ws.out_dir, self,
                                   on_error=lambda e: logger.opt(exception=e).error("event handler failed"),
                                   classified_dir=self.classified_dir if learning else None)
        folders = [self.ws.heads_dir, self.inbox_dir, self.ws.out_dir] + ([self.classified_dir] if learning else [])
        self.observer = start_observer(handler, folders)
        if self.config.learning.confirm_after_days > 0:
            self.scheduler.add_job(self.tasks.put, "interval", args=[Task("confirm")], hours=1, id="confirm")
        self.worker = threading.Thread(target=self._work, name="hmd-worker", daemon=True)
        self.worker.start()
        logger.info("hmd {} started: workspace {}, inbox {}, socket {}", os.getpid(), self.ws.root, self.inbox_dir,
                    self.socket_path)
        self.tasks.put(Task("startup"))
        self._start_web()

    def stop(self) -> None:
        """Finish the file operation in flight, then stop everything (well within 10 s)."""
        logger.info("stopping")
        self._stopping.set()
        self.notifier.notify("STOPPING=1")
        if self.observer is not None:
            self.observer.stop()
        if self.server is not None:
            self.server.stop()
        self._stop_web()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        self.tasks.put(_STOP)
        if self.worker is not None:
            self.worker.join(timeout=STOP_GRACE_S)
            if self.worker.is_alive():
                logger.warning("the current job did not finish within {}s; exiting anyway", STOP_GRACE_S)
        if self.ctx is not None and not (self.worker and self.worker.is_alive()):
            self.ctx.close()
        logger.info("stopped")

    def _take_lock(self) -> None:
        """One daemon per workspace: an exclusive lock the kernel drops if we die."""
        path = self.ws.root / ".hmd.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise HeadmasterError(f"another hmd is already running on workspace {self.ws.root} (lock {path})") \
                from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _start_watchdog_pings(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return
        interval = max(0.5, int(usec) / 1e6 / 2)  # ping at twice the rate systemd asks for

        def ping() -> None:
            if self.worker is not None and self.worker.is_alive():
                self.notifier.notify("WATCHDOG=1")

        self.scheduler.add_job(ping, "interval", seconds=interval, id="watchdog")
        logger.info("systemd watchdog: pinging every {:.1f}s", interval)

    # -- the review page (headmaster/web), served from its own thread ----------------------
    def _start_web(self) -> None:
        web = self.config.web
        if not web.enabled:
            return
        from headmaster.daemon.review import DaemonReview
        from headmaster.web.server import WebError, WebServer

        try:
            self.review = DaemonReview(self)
            self.web = WebServer(self.review, web.listen, web.token)
            url = self.web.start()
        except (WebError, OSError) as e:  # the daemon's sorting matters more than its page: go on without it
            self.web_error = str(e)
            logger.error("review page not served: {}", e)
            return
        logger.info("review page: {}", url)

    def _stop_web(self) -> None:
        if self.web is not None:
            self.web.stop()
        if self.review is not None:
            self.review.close()

    def _web_status(self) -> dict[str, Any] | None:
        if self.web is not None:
            return self.web.info()
        return {"error": self.web_error} if self.web_error else None

    # -- config -----------------------------------------------------------------------
    def reload(self) -> dict[str, Any]:
        """Re-read the config; timings, logging and training settings apply now, paths need a restart."""
        new = load_config(self.config.source, self.ws.root)
        setup_logging(new)
        restart = [key for key, old, now in (
            ("workspace", self.ws.root, new.workspace_root), ("inbox.path", self.inbox_dir, new.inbox_dir),
            ("daemon.socket", self.socket_path, new.socket_path), ("daemon.device", self.config.daemon.device,
                                                                   new.daemon.device)) if old != now]
        self.config = new
        self.settler.settle_seconds = new.daemon.settle_seconds
        if restart:
            logger.warning("config reloaded; restart hmd to apply: {}", ", ".join(restart))
        else:
            logger.info("config reloaded from {}", new.source or "defaults")
        return {"config": str(new.source) if new.source else None, "restart_needed": restart}

    # -- event sink (observer thread) ----------------------------------------------------
    def example_changed(self, head: str, path: Path, writing: bool) -> None:
        self._arm_settle(self.settler.touch(path, writing))
        self._mark_dirty(head)

    def example_closed(self, head: str, path: Path) -> None:
        self._arm_settle(self.settler.closed(path))
        self._mark_dirty(head)

    def example_removed(self, head: str, path: Path) -> None:
        self.settler.forget(path)
        self.tasks.put(Task("forget", head, (path,)))
        self._mark_dirty(head)

    def head_changed(self, head: str, folder: Path | None) -> None:
        if head.startswith("."):
            return
        if folder is None:
            self.settler.forget_under(self.ws.heads_dir / head)
        self._mark_dirty(head)

    def inbox_changed(self, head: str, path: Path, writing: bool) -> None:
        self._arm_settle(self.settler.touch(path, writing))

    def inbox_closed(self, head: str, path: Path) -> None:
        self._arm_settle(self.settler.closed(path))

    def inbox_removed(self, path: Path) -> None:
        self.settler.forget(path)
        self.settler.forget_under(path)

    def inbox_folder(self, head: str, folder: Path) -> None:
        for f in inbox_files(folder):
            self._arm_settle(self.settler.touch(f))

    def classified_changed(self, head: str, bucket: str, path: Path, writing: bool) -> None:
        self._arm_settle(self.settler.touch(path, writing))

    def classified_closed(self, head: str, bucket: str, path: Path) -> None:
        self._arm_settle(self.settler.closed(path))

    def checkpoint_written(self, head: str) -> None:
        self.tasks.put(Task("sort", head))  # e.g. `hm train` beside us: waiting inbox files can go now

    # -- timers (scheduler thread) -------------------------------------------------------
    def _mark_dirty(self, head: str) -> None:
        if self._stopping.is_set():
            return
        delay = self.state.mark_dirty(head, self.config.daemon.debounce_seconds, self.config.daemon.max_delay_seconds)
        self.scheduler.add_job(self.tasks.put, "date", args=[Task("retrain", head)], id=f"retrain:{head}",
                               replace_existing=True, run_date=_after(delay))

    def _arm_settle(self, due: float) -> None:
        """Make sure a settle check runs no later than monotonic time `due`."""
        if self._stopping.is_set():
            return
        with self._settle_lock:
            if self._settle_armed is not None and self._settle_armed <= due:
                return
            self._settle_armed = due
            self.scheduler.add_job(self._settle_check, "date", id="settle", replace_existing=True,
                                   run_date=_after(due - time.monotonic()))

    def _settle_check(self) -> None:
        with self._settle_lock:
            self._settle_armed = None
        settled, next_due = self.settler.check()
        if settled:
            self.tasks.put(Task("settled", paths=tuple(settled)))
        if next_due is not None:
            self._arm_settle(next_due)

    # -- the worker ----------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            task = self.tasks.get()
            if task is _STOP or self._stopping.is_set():
                return
            try:
                if task.kind != "call":
                    self._set_activity(task.kind)
                self._do(task)
            except HeadmasterError as e:
                self.state.count("errors")
                logger.error("{}: {}", task.kind, e)
            except Exception:
                self.state.count("errors")
                logger.exception("{} failed", task.kind)
            finally:
                self._set_activity("idle" if self.tasks.empty() else "busy")

    def _do(self, task: Task) -> None:
        if task.kind == "startup":
            self._startup()
        elif task.kind == "rescan":
            self._reconcile()
            self._sort_all()
        elif task.kind == "settled":
            self._settled(task.paths)
        elif task.kind == "retrain":
            self._retrain(task.head, task.force)
        elif task.kind == "sort":
            self._sort_inbox(task.head)
        elif task.kind == "forget":
            self.ctx.store.forget_files(str(p) for p in task.paths)
        elif task.kind == "confirm":
            self._confirm()
        elif task.kind == "call":
            try:
                task.future.set_result(task.call())
            except BaseException as e:
                task.future.set_exception(e)

    def _startup(self) -> None:
        self._set_activity("reconciling")
        ensure_schema(self.ctx.store)
        left = resolve_leftovers(self.ctx.store, self.inbox_dir, self.classified_dir)
        if left.temps:
            logger.info("removed {} temporary file(s) left by an interrupted move", left.temps)
        for dup, kept in left.duplicates:
            logger.info("{} was already sorted to {}: removed the inbox copy", dup, kept)
        self.state.count("duplicates_resolved", len(left.duplicates))
        self._reconcile()
        self._sort_all()
        if self.config.learning.confirm_after_days > 0:
            self._confirm()
        self.notifier.notify("READY=1")
        logger.info("ready: {} head(s), {} file(s) waiting in the inbox", len(self.ws.head_names()),
                    self._queued_total())
        if not self.ws.head_names():
            logger.info("no heads yet: make {}/<head>/<bucket>/ folders and drop example photos in them; hmd then "
                        "trains each head and sorts what lands in {}/<head>/", self.ws.heads_dir, self.inbox_dir)

    def _reconcile(self) -> None:
        """Find what changed while we were not watching: stat-only against the file index."""
        live = {str(p) for name in self.ws.head_names() for p, _ in self.ws.head(name).labelled_images()}
        gone = [r.path for r in self.ctx.store.files_under(str(self.ws.heads_dir) + os.sep) if r.path not in live]
        if gone:
            self.ctx.store.forget_files(gone)
            logger.info("{} example(s) removed while hmd was down", len(gone))
        model = self._model() if self.ws.head_names() else None  # no heads: no model to prepare yet
        for name in self.ws.head_names():
            (self.inbox_dir / name).mkdir(parents=True, exist_ok=True)
            if model is None or self._stopping.is_set():
                continue
            self._embed(model, [p for p, _ in self.ws.head(name).labelled_images()], name)
            fresh = needs_retrain(self.ws, name, model.name)
            if fresh.retrain:
                logger.info("head {}: {}: retraining", name, fresh.reason)
                self.state.mark_dirty(name, 0.0, 0.0)  # shows as pending until the worker gets to it
                self.tasks.put(Task("retrain", name))

    def _model(self) -> Model | None:
        try:
            return self.ctx.active_model()
        except HeadmasterError as e:
            self._tell_once("model", f"{e}; then `hmctl rescan`")
            return None

    def _embed(self, model: Model, paths: list[Path], head: str) -> None:
        for start in range(0, len(paths), EMBED_CHUNK):
            if self._stopping.is_set():
                return
            self._set_activity(f"embedding {head}")
            result = embed_paths(self.ctx.store, model, paths[start : start + EMBED_CHUNK], device=self.ctx.options.device,
                                 progress=False, label=f"Embedding {head}")
            if result.embedded:
                logger.info("head {}: embedded {} new image(s)", head, result.embedded)
            for s in result.skipped:
                if s.reason != "file vanished" and self._tell_once(f"unreadable:{s.path}", f"cannot use example {s.path}: "
                                                                                           f"{s.reason}"):
                    self.state.count("unreadable_examples")

    def _settled(self, paths: tuple[Path, ...]) -> None:
        examples: dict[str, list[Path]] = defaultdict(list)
        inbox: set[str] = set()
        corrected: list[Path] = []
        for p in paths:
            if (parts := _parts(p, self.ws.heads_dir)) is not None:
                examples[parts[0]].append(p)
            elif (parts := _parts(p, self.inbox_dir)) is not None:
                inbox.add(parts[0])
            elif (parts := _parts(p, self.classified_dir)) is not None and len(parts) == 3:
                corrected.append(p)
        if corrected:
            self._learn(corrected)
        model = self._model() if examples else None
        for head, files in examples.items():
            if model is not None:
                self._embed(model, files, head)
        for head in sorted(inbox):
            self._sort_inbox(head, settled=set(paths))

    # -- learning from corrections -------------------------------------------------------
    def _learn(self, paths: list[Path]) -> None:
        """Files the user put into classified/<head>/<bucket>/ become examples of that bucket."""
        hashes, _, _ = hash_paths(self.ctx.store, paths)
        for path, hash_ in hashes.items():
            head, bucket, _ = path.relative_to(self.classified_dir).parts
            if head not in self.ws.head_names():
                continue
            if not is_correction(self.ctx.store, head, bucket, path, hash_):
                continue
            self._teach(head, bucket, path, hash_, "correction")

    def _teach(self, head: str, bucket: str, path: Path, hash_: str, kind: str, store: Store | None = None
               ) -> Learned:
        """Learn one example; `store`: the caller's connection (the review page teaches from its own thread)."""
        learned = learn(store or self.ctx.store, self.ws, head, bucket, path, hash_, kind)
        if learned.action == "unchanged":
            return learned
        was = f" (was {learned.previous})" if learned.previous and learned.previous != bucket else ""
        logger.info("learned from {}: {} is {}{} -> {} example {}", kind, path.name, bucket, was, learned.action,
                    learned.example.relative_to(self.ws.heads_dir))
        with self.state.lock:
            self.state.head(head).corrections += 1
        self._mark_dirty(head)
        return learned

    def _confirm(self) -> None:
        """Confident sorts the user left alone for confirm_after_days become examples too."""
        for head, bucket, path, hash_ in confirmable(self.ctx.store, self.ws, self.config.learning.confirm_after_days):
            if head in self.ws.head_names():
                self._teach(head, bucket, path, hash_, "confirmed")

    def _on_worker(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the worker thread (the one that owns the model and the database) and wait."""
        future: Future = Future()
        self.tasks.put(Task("call", call=fn, future=future))
        try:
            return future.result(timeout=CALL_TIMEOUT_S)
        except TimeoutError:
            raise HeadmasterError(f"hmd is busy; try again (no answer within {CALL_TIMEOUT_S:.0f}s)") from None

    def _retrain(self, head: str, force: bool) -> None:
        if head not in self.ws.head_names():
            with self.state.lock:
                self.state.heads.pop(head, None)
            return
        (self.inbox_dir / head).mkdir(parents=True, exist_ok=True)
        with self.state.lock:
            h = self.state.head(head)
            first = h.first_change
        cap = self.config.daemon.max_delay_seconds
        if not force and self.settler.pending_under(self.ws.heads_dir / head) and first is not None \
                and time.monotonic() - first < cap:
            self._mark_dirty(head)  # files still arriving: wait for quiet (the max delay still holds)
            return
        self.state.begin_retrain(head)
        model = self._model()
        if model is None:
            return
        if not force:
            fresh = needs_retrain(self.ws, head, model.name)
            if not fresh.retrain:
                logger.info("head {}: {}: not retraining", head, fresh.reason)
                return
        labelled = self.ws.head(head)
        errors, _ = labelled.problems()
        if errors:
            with self.state.lock:
                h.last_error = "; ".join(errors)
            self._tell_once(f"cannot-train:{head}:{h.last_error}", f"head {head} cannot train yet: {h.last_error}")
            return
        t = self.config.training
        self._set_activity(f"training {head}")
        with self.state.lock:
            h.training = True
        started = time.perf_counter()
        try:
            report = train_one(self.ctx, head, TrainConfig(epochs=t.epochs, lr=t.lr, seed=t.seed))
        except HeadmasterError as e:
            with self.state.lock:
                h.last_error = str(e)
            raise
        finally:
            with self.state.lock:
                h.training = False
            release_freed_memory()  # the daemon idles after this: give training's freed memory back
        with self.state.lock:
            h.retrains += 1
            h.last_error = None
        m = report.metrics
        score = f"F1 {m['f1']:.2f}" if "f1" in m else f"accuracy {m.get('accuracy', 0):.2f}"
        logger.success("trained {} ({}, {} images) in {:.1f}s: {}", head, report.head_type, report.images,
                       time.perf_counter() - started, score)
        self._sort_inbox(head)

    # -- sorting -------------------------------------------------------------------------
    def _sort_all(self) -> None:
        for head in inbox_heads(self.inbox_dir):
            if self._stopping.is_set():
                return
            self._sort_inbox(head)

    def _load_trained(self, head: str) -> tuple[TrainedHead, Model]:
        """The head's checkpoint, loaded once per version of the file."""
        path = self.ws.checkpoint_path(head)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise HeadmasterError(f"head '{head}' is not trained yet") from None
        key = (st.st_mtime_ns, st.st_size)
        hit = self._trained.get(head)
        model = self.ctx.active_model()
        if hit and hit[0] == key and hit[2] == model:
            return hit[1], hit[2]
        trained, model = load_trained(self.ctx, head)
        self._trained[head] = (key, trained, model)
        return trained, model

    def _sort_inbox(self, head: str, settled: set[Path] = frozenset()) -> None:
        """Sort every settled file in <inbox>/<head>/; files stay when paused or the head cannot sort yet.

        Files the settler has not seen yet (present at start, or their events still on the way)
        must look old enough; `settled` ones are known complete (even with an mtime in the future).
        """
        if self.state.paused or self._stopping.is_set():
            return
        folder = self.inbox_dir / head
        now = time.time()
        ready: list[Path] = []
        for f in inbox_files(folder):
            if self.settler.is_pending(f):
                continue
            if f in settled:
                ready.append(f)
                continue
            try:
                young = now - os.stat(f).st_mtime < self.config.daemon.settle_seconds
            except FileNotFoundError:
                continue
            if young:  # seen before its events arrived: let it settle first
                self._arm_settle(self.settler.touch(f))
            else:
                ready.append(f)
        if not ready:
            return
        if head not in self.ws.head_names():
            self._tell_once(f"nohead:{head}", f"inbox/{head}: no head '{head}' in {self.ws.heads_dir}; "
                                              f"{len(ready)} file(s) wait")
            return
        try:
            trained, model = self._load_trained(head)
        except HeadmasterError as e:
            self._tell_once(f"wait:{head}:{e}", f"inbox/{head}: {len(ready)} file(s) wait: {e}")
            return
        dry_run = self.config.inbox.dry_run
        if dry_run:  # files stay in the inbox: report each version of a file once
            ready = [f for f in ready if self._dry_key(f) not in self._dry_reported]
            if not ready:
                return
        self._set_activity(f"sorting {head}")
        result = sort_files(self.ctx, head, trained, model, ready, self.classified_dir / head,
                            should_stop=self._stopping.is_set, on_placed=self._placed, dry_run=dry_run)
        if dry_run:
            self._dry_reported.update(self._dry_key(p.source) for p in result.placed + result.rejected)

    @staticmethod
    def _dry_key(path: Path) -> tuple[str, int, int]:
        try:
            st = os.stat(path)
        except OSError:
            return (str(path), -1, -1)
        return (str(path), st.st_size, st.st_mtime_ns)

    def _placed(self, p: Placed) -> None:
        where = p.destination.relative_to(self.classified_dir)
        if self.config.inbox.dry_run:
            score = "" if p.score is None else f" ({p.score:.2f})"
            logger.info("dry run: would move {} -> {}{}{}", p.source.name, where, score,
                        f": {p.reason}" if p.reason else "")
            return
        if p.bucket == REJECTED:
            logger.warning("rejected {} -> {}: {}", p.source.name, where, p.reason)
        else:
            logger.info("sorted {} -> {} ({:.2f})", p.source.name, where, p.score)
        with self.state.lock:
            if p.bucket == REJECTED:
                self.state.rejected += 1
            else:
                self.state.sorted += 1

    # -- control (socket threads) --------------------------------------------------------
    def handle_request(self, request: dict[str, Any]) -> Any:
        cmd = request["cmd"]
        if cmd == "ping":
            return {"pong": True, "pid": os.getpid()}
        if cmd == "status":
            return self.status()
        if cmd == "retrain":
            head = request.get("head")
            if head is not None and not isinstance(head, str):
                raise HeadmasterError("'head' must be a string")
            names = [self.ws.head(head).name] if head else self.ws.head_names()
            for name in names:
                self.tasks.put(Task("retrain", name, force=True))
            return {"queued": names}
        if cmd == "rescan":
            self.tasks.put(Task("rescan"))
            return {"queued": True}
        if cmd in ("pause", "resume"):
            with self.state.lock:
                self.state.paused = cmd == "pause"
            logger.info("sorting {}", "paused" if cmd == "pause" else "resumed")
            if cmd == "resume":
                for head in inbox_heads(self.inbox_dir):
                    self.tasks.put(Task("sort", head))
            self._set_activity(self.state.activity)
            return {"paused": cmd == "pause"}
        if cmd == "reload":
            return self.reload()
        if cmd == "uncertain":
            head, limit = request.get("head"), request.get("limit")
            if not isinstance(head, str) or not (limit is None or isinstance(limit, int) and limit > 0):
                raise HeadmasterError("uncertain needs 'head' (a string) and an optional positive 'limit'")
            ranked = self._on_worker(lambda: rank_uncertain(self.ctx, head, limit))
            return [{"path": str(u.path), "guess": u.bucket, "score": round(u.score, 4), "margin": round(u.margin, 4)}
                    for u in ranked]
        raise HeadmasterError(f"unknown command {cmd!r} (commands: {', '.join(COMMANDS)})")

    def status(self) -> dict[str, Any]:
        """Everything `hmctl status` shows; reads a snapshot, never blocks on the worker."""
        try:
            with Store(self.ws.db_path) as store:
                model = store.active_model().name
        except HeadmasterError:
            model = None
        heads: dict[str, Any] = {}
        learned: dict[str, dict[str, int]] = {}
        with Store(self.ws.db_path) as store:
            for name in self.ws.head_names():
                learned[name] = correction_counts(store, name)
        for name in self.ws.head_names():
            try:
                labelled = self.ws.head(name)
            except HeadmasterError:
                continue  # deleted while we looked
            ck = self.checkpoints.summary(self.ws.checkpoint_path(name)) or {}
            with self.state.lock:
                h = self.state.head(name)
                info = {"retrains": h.retrains, "pending_retrain": h.pending, "next_retrain": iso(h.next_retrain),
                        "training": h.training, "error": h.last_error or ck.get("error"),
                        "corrections": h.corrections}
            heads[name] = {
                **head_fields(labelled, ck),
                **info,
                "waiting": len(inbox_files(self.inbox_dir / name)),
                "examples_from_corrections": learned.get(name, {}).get("examples", 0),
            }
        with self.state.lock:
            s = self.state
            counters = {"sorted": s.sorted, "rejected": s.rejected}
            extra = {"paused": s.paused, "activity": s.activity, "errors": s.errors,
                     "unreadable_examples": s.unreadable_examples, "bad_requests": s.bad_requests,
                     "duplicates_resolved": s.duplicates_resolved}
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.state.started, 1),
            "model": model,
            "workspace": str(self.ws.root),
            "config": str(self.config.source) if self.config.source else None,
            "socket": str(self.socket_path),
            "heads": heads,
            "inbox": {"path": str(self.inbox_dir), "queued": self._queued_total(), **counters},
            "settling": len(self.settler),
            "queued_tasks": self.tasks.qsize(),
            "web": self._web_status(),
            **extra,
        }

    # -- helpers -------------------------------------------------------------------------
    def _queued_total(self) -> int:
        return sum(len(inbox_files(self.inbox_dir / h)) for h in inbox_heads(self.inbox_dir))

    def _set_activity(self, activity: str) -> None:
        with self.state.lock:
            self.state.activity = activity
            paused = " (sorting paused)" if self.state.paused else ""
            line = f"{activity}{paused}; sorted {self.state.sorted}, rejected {self.state.rejected}"
        self.notifier.notify(f"STATUS={line}")

    def _tell_once(self, key: str, message: str) -> bool:
        """Log a warning the first time a situation occurs; True if it was new."""
        if key in self._told:
            return False
        self._told.add(key)
        logger.warning(message)
        return True


def _after(seconds: float) -> datetime:
    return datetime.now(timezone.utc) + timedelta(seconds=max(0.0, seconds))


def _parts(path: Path, root: Path) -> tuple[str, ...] | None:
    try:
        return path.relative_to(root).parts or None
    except ValueError:
        return None
