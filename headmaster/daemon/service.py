"""The Daemon (hmd's supervisor): watches the workspace, schedules work, moves files, answers hmctl.

hmd is two processes:
- this supervisor, which never imports torch or transformers (tests/test_daemon_worker.py pins it):
  watchdog, APScheduler, the control socket, the review page (headmaster/web, served from its
  own thread; its backend headmaster/daemon/review.py), the sort log and every file move
  (headmaster/daemon/inbox.py, fileops.py, and the page's labels, undos and exclusions);
- a worker process (headmaster/daemon/worker.py), started on demand through
  `self.worker` (headmaster/daemon/worker_client.py), which loads the model, decodes
  images, embeds, trains and scores, and exits after `[daemon] model_idle_seconds` without
  work. It returns decisions; it never moves a file.
The two talk over a socketpair with plain JSON messages (headmaster/daemon/protocol.py).
Any model-backed answer is a named call: `self.worker.call("rank_uncertain", head=..., limit=...)`,
`self.worker.call("suspects", head=..., folds=..., limit=...)`, the review page's `figures`,
and the job thread's `default_model`, `embed`, `train` and `decide`.

Who writes what in headmaster.db (WAL mode, busy timeout: both processes write safely):
- the supervisor: the sort log (`sorts`), the file index after a move or removal (`files`),
  `corrections` (learning), and `unusable` rows for files that crashed the worker twice;
- the worker: vectors (`embeddings`), file index rows of files it hashed, `unusable` rows for
  contents the model cannot read; and checkpoints in out/ (atomic writes, as `hm train`).

Threads in the supervisor and who does what:
- watchdog's observer thread classifies events and marks heads dirty (no I/O beyond stat);
- APScheduler's thread runs timers only: settle checks, debounced retrains, watchdog pings;
  each timer just queues work;
- one job thread does all real work in order (embed, train, sort), so a file is never sorted
  twice; it waits on the worker for decisions and moves the files itself;
- control threads answer the socket from a state snapshot (model-backed answers wait for the
  worker, which does one thing at a time).
Nothing polls: every thread blocks until an event, a timer or a request wakes it.

Crashes: a worker that dies in a call (segfault, OOM kill, kill -9) is logged and restarted on
the next call; the files of the call that crashed are retried once each, on their own, and a
file that kills the worker again goes to `_rejected/` ("crashed the decoder") and is remembered
as unusable. Damaged files of our own (headmaster.db, a checkpoint) are reported in the log and
in `hmctl status` under `problems`; nothing is deleted or overwritten to repair them.
"""

from __future__ import annotations

import fcntl
import os
import queue
import signal
import sqlite3
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import sdnotify
from apscheduler.schedulers.background import BackgroundScheduler
from loguru import logger

from headmaster import HeadmasterError
from headmaster.config import Config, load_config
from headmaster.curation import Learned, confirmable, correction_counts, ensure_schema, is_correction, learn
from headmaster.daemon.control import ControlServer
from headmaster.daemon.inbox import REJECTED, Placed, Verdict, inbox_files, inbox_heads, resolve_leftovers, sort_files
from headmaster.daemon.logs import setup_logging
from headmaster.daemon.state import DaemonState, iso, needs_retrain
from headmaster.daemon.watcher import Settler, WorkspaceHandler, reports_closes, start_observer
from headmaster.daemon.worker_client import WorkerClient, WorkerCrashed, rss_mib
from headmaster.embedding import PILLOW_VERSION, file_sha256, hash_paths, scan_paths
from headmaster.fileops import unique_path
from headmaster.heads import CheckpointCache, head_fields
from headmaster.store import Model, Store, damaged_message
from headmaster.workspace import Workspace

STOP_GRACE_S = 8.0  # systemd's stop timeout is longer; we promise 10 s
COMMANDS = ("status", "retrain", "rescan", "pause", "resume", "reload", "uncertain", "suspects", "ping")
CALL_TIMEOUT_S = 120.0  # how long a control request waits for the worker to be free
CRASHED = "crashed the decoder"  # the reason given for a file that killed the worker twice


@dataclass(frozen=True)
class Task:
    kind: str  # startup | settled | retrain | sort | forget | rescan | confirm
    head: str | None = None
    paths: tuple[Path, ...] = ()
    force: bool = False


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
        self.store: Store | None = None  # the supervisor's own connection; None while headmaster.db is unusable
        self.server: ControlServer | None = None
        self.observer = None
        self.worker = WorkerClient({"workspace": str(self.ws.root), "device": config.daemon.device,
                                    "backend": config.embedding.backend},
                                   config.daemon.model_idle_seconds)
        self.jobs: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._stop_asked = False
        self._reload_asked = False
        self._settle_lock = threading.Lock()
        self._settle_armed: float | None = None
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
        started = time.perf_counter()
        self._take_lock()
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
        self.jobs = threading.Thread(target=self._work, name="hmd-jobs", daemon=True)
        self.jobs.start()
        # ready now: the socket answers; the model loads in the worker when there is work for it
        self.notifier.notify("READY=1")
        logger.info("hmd {} ready in {:.2f}s: workspace {}, inbox {}, socket {}", os.getpid(),
                    time.perf_counter() - started, self.ws.root, self.inbox_dir, self.socket_path)
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
        self.worker.close()  # a job waiting on the worker returns at once; no file is mid-move in the worker
        if self.jobs is not None:
            self.jobs.join(timeout=STOP_GRACE_S)
            if self.jobs.is_alive():
                logger.warning("the current job did not finish within {}s; exiting anyway", STOP_GRACE_S)
        if self.store is not None and not (self.jobs and self.jobs.is_alive()):
            self.store.close()
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
            if self.jobs is not None and self.jobs.is_alive():
                self.notifier.notify("WATCHDOG=1")

        self.scheduler.add_job(ping, "interval", seconds=interval, id="watchdog")
        logger.info("systemd watchdog: pinging every {:.1f}s", interval)

    # -- the review page (headmaster/web), served from its own thread ----------------------
    def _start_web(self) -> None:
        web = self.config.web
        if not web.enabled:
            return
        from headmaster.web import ReviewService, WebError, WebServer

        try:
            # the page's model work goes to the worker process; a label is learned at once, as a moved file is
            self.review = ReviewService(
                self.ws, self.worker_call, live=self.status,
                teach=lambda store, head, bucket, path, hash_: self._teach(head, bucket, path, hash_, "correction",
                                                                          store=store))
            self.web = WebServer(self.review, web.listen, web.token)
            url = self.web.start()
        except (WebError, OSError, HeadmasterError, sqlite3.DatabaseError) as e:
            # the daemon's sorting matters more than its page (e.g. a damaged headmaster.db): go on without it
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
        self.worker.set_idle_seconds(new.daemon.model_idle_seconds)
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

    # -- the job thread ------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            task = self.tasks.get()
            if task is _STOP or self._stopping.is_set():
                return
            try:
                self._set_activity(task.kind)
                if self._store_ready():
                    self._do(task)
            except WorkerCrashed as e:
                if self._stopping.is_set():
                    return
                self.state.count("errors")
                logger.error("{}: {}", task.kind, e)
            except HeadmasterError as e:
                self.state.count("errors")
                logger.error("{}: {}", task.kind, e)
            except sqlite3.DatabaseError as e:  # damaged while we ran: report it, stop using it, keep running
                self.state.count("errors")
                self._database_lost(e)
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
            self.store.forget_files(str(p) for p in task.paths)
        elif task.kind == "confirm":
            self._confirm()

    # -- our own files: the database ----------------------------------------------------
    def _store_ready(self) -> bool:
        """Open headmaster.db if it is not open; a damaged one is reported (log, status), never touched."""
        if self.store is not None:
            return True
        try:
            store = Store(self.ws.db_path)
            ensure_schema(store)
        except HeadmasterError as e:
            self._problem("database", str(e))
            return False
        except sqlite3.DatabaseError as e:
            self._problem("database", damaged_message(self.ws.db_path, e))
            return False
        self.store = store
        self._problem("database", None)
        return True

    def _database_lost(self, error: Exception) -> None:
        self._problem("database", damaged_message(self.ws.db_path, error))
        if self.store is not None:
            self.store.close()
            self.store = None  # the next job (or `hmctl rescan`) tries again

    def _problem(self, key: str, message: str | None) -> None:
        """Report a damaged file of our own once (log + status), or clear it when it is fine again."""
        with self.state.lock:
            before = self.state.problems.get(key)
            if message is None:
                self.state.problems.pop(key, None)
            else:
                self.state.problems[key] = message
        if message is not None and message != before:
            logger.error("{}: {}; files wait, nothing is changed until it is fixed", key, message)
        elif message is None and before is not None:
            logger.info("{}: fine again", key)

    def _startup(self) -> None:
        self._set_activity("reconciling")
        left = resolve_leftovers(self.store, self.inbox_dir, self.classified_dir)
        if left.temps:
            logger.info("removed {} temporary file(s) left by an interrupted move", left.temps)
        for dup, kept in left.duplicates:
            logger.info("{} was already sorted to {}: removed the inbox copy", dup, kept)
        self.state.count("duplicates_resolved", len(left.duplicates))
        self._reconcile()
        self._sort_all()
        if self.config.learning.confirm_after_days > 0:
            self._confirm()
        logger.info("start-up checks done: {} head(s), {} file(s) waiting in the inbox", len(self.ws.head_names()),
                    self._queued_total())
        if not self.ws.head_names():
            logger.info("no heads yet: make {}/<head>/<bucket>/ folders and drop example photos in them; hmd then "
                        "trains each head and sorts what lands in {}/<head>/", self.ws.heads_dir, self.inbox_dir)

    def _reconcile(self) -> None:
        """Find what changed while we were not watching: stat-only against the file index."""
        live = {str(p) for name in self.ws.head_names() for p, _ in self.ws.head(name).labelled_images()}
        gone = [r.path for r in self.store.files_under(str(self.ws.heads_dir) + os.sep) if r.path not in live]
        if gone:
            self.store.forget_files(gone)
            logger.info("{} example(s) removed while hmd was down", len(gone))
        model = self._model() if self.ws.head_names() else None  # no heads: no model to prepare yet
        for name in self.ws.head_names():
            (self.inbox_dir / name).mkdir(parents=True, exist_ok=True)
            if model is None or self._stopping.is_set():
                continue
            self._embed(model, [p for p, _ in self.ws.head(name).labelled_images()], name)
            if self._checkpoint_damaged(name):
                continue
            fresh = needs_retrain(self.ws, name, model.name)
            if fresh.retrain:
                logger.info("head {}: {}: retraining", name, fresh.reason)
                self.state.mark_dirty(name, 0.0, 0.0)  # shows as pending until the worker gets to it
                self.tasks.put(Task("retrain", name))

    def _model(self) -> Model | None:
        try:
            return self.store.active_model() if self.store.models() else self._register_default_model()
        except HeadmasterError as e:
            self._tell_once("model", f"{e}; then `hmctl rescan`")
            return None

    def _register_default_model(self) -> Model:
        """No model registered yet: the worker registers the built-in backbone as `default` (preparing it
        needs torch, which the supervisor never imports) and says so in one line."""
        for notice in self._call("default_model")["notices"]:
            logger.info(notice)
        return self.store.active_model()

    def _embed(self, model: Model, paths: list[Path], head: str) -> None:
        """Make sure the examples have vectors: only files the cache lacks go to the worker."""
        todo, unusable = self._uncached(model, paths)
        for path, reason in unusable:
            self._unreadable_example(path, reason)
        chunk = self.config.daemon.max_batch_images
        for start in range(0, len(todo), chunk):
            if self._stopping.is_set():
                return
            self._set_activity(f"embedding {head}")
            results, crashed = self._call_per_file("embed", todo[start : start + chunk])
            embedded = sum(r["embedded"] for r in results)
            if embedded:
                logger.info("head {}: embedded {} new image(s)", head, embedded)
            for path_, reason in (s for r in results for s in r["skipped"]):
                if reason != "file vanished":
                    self._unreadable_example(Path(path_), reason)
            for path in crashed:
                self._unreadable_example(path, CRASHED)

    def _unreadable_example(self, path: Path, reason: str) -> None:
        if self._tell_once(f"unreadable:{path}", f"cannot use example {path}: {reason}"):
            self.state.count("unreadable_examples")

    def _uncached(self, model: Model, paths: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
        """(files the worker must embed, known files the model cannot use with their reasons), from the
        file index and the cache alone: an unchanged, cached labelled set never wakes the worker."""
        scan = scan_paths(self.store, paths, model.id)
        missing = {p: h for p, h in scan.known.items() if h not in scan.cached}
        bad = self.store.unusable(model.id, set(missing.values()), PILLOW_VERSION) if missing else {}
        todo = [p for p, h in missing.items() if h not in bad] + [p for p, _, _ in scan.to_read]
        return todo, [(p, bad[h]) for p, h in missing.items() if h in bad]

    def _call_per_file(self, op: str, paths: list[Path], **args: Any) -> tuple[list[Any], list[Path]]:
        """Run `op` over `paths` in the worker; if the worker dies, retry each of those files once, alone.

        Returns (the results, the files that crashed the worker a second time). Those are remembered as
        unusable for the active model, so neither hmd nor hm decodes them again (until Pillow changes).
        """
        try:
            return [self.worker.call(op, paths=[str(p) for p in paths], **args)], []
        except WorkerCrashed as e:
            if self._stopping.is_set():
                raise
            self._worker_crashed(e, len(paths))
        results, crashed = [], []
        for path in paths:
            try:
                results.append(self.worker.call(op, paths=[str(path)], **args))
            except WorkerCrashed as e:
                if self._stopping.is_set():
                    raise
                self._worker_crashed(e, 1)
                crashed.append(path)
        self._remember_crashes(crashed)
        return results, crashed

    def _worker_crashed(self, error: WorkerCrashed, files: int) -> None:
        self.state.count("errors")
        logger.error("{}; restarting it{}", error, f" and retrying its {files} file(s) one by one" if files > 1
                     else " and retrying the file once" if files == 1 else "")

    def _remember_crashes(self, paths: list[Path]) -> None:
        model = self._model()
        if model is None:
            return
        found = []
        for path in paths:
            logger.error("{} crashed the worker twice: never decoded again by this model", path)
            try:
                found.append((file_sha256(path), CRASHED))
            except OSError:
                pass
        self.store.put_unusable(model.id, found, PILLOW_VERSION)

    def _call(self, op: str, **args: Any) -> Any:
        """A worker call that is retried once if the worker dies in it."""
        try:
            return self.worker.call(op, **args)
        except WorkerCrashed as e:
            if self._stopping.is_set():
                raise
            self._worker_crashed(e, 0)
        return self.worker.call(op, **args)

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
        hashes, _, _ = hash_paths(self.store, paths)
        for path, hash_ in hashes.items():
            head, bucket, _ = path.relative_to(self.classified_dir).parts
            if head not in self.ws.head_names():
                continue
            if not is_correction(self.store, head, bucket, path, hash_):
                continue
            self._teach(head, bucket, path, hash_, "correction")

    def _teach(self, head: str, bucket: str, path: Path, hash_: str, kind: str, store: Store | None = None
               ) -> Learned:
        """Learn one example; `store`: the caller's connection (the review page teaches from its own thread)."""
        learned = learn(store or self.store, self.ws, head, bucket, path, hash_, kind)
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
        for head, bucket, path, hash_ in confirmable(self.store, self.ws, self.config.learning.confirm_after_days):
            if head in self.ws.head_names():
                self._teach(head, bucket, path, hash_, "confirmed")

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
        if self._checkpoint_damaged(head):
            if not force:
                return  # never trained over without the user asking (`hmctl retrain`, `hm train`)
            self._set_damaged_checkpoint_aside(head)
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
        # examples that crash the worker are found one by one here and skipped by training
        self._embed(model, [p for p, _ in labelled.labelled_images()], head)
        self._set_activity(f"training {head}")
        with self.state.lock:
            h.training = True
        started = time.perf_counter()
        try:
            report = self._call("train", head=head, epochs=t.epochs, lr=t.lr, seed=t.seed)
        except HeadmasterError as e:
            with self.state.lock:
                h.last_error = str(e)
            raise
        finally:
            with self.state.lock:
                h.training = False
        with self.state.lock:
            h.retrains += 1
            h.last_error = None
        m = report["metrics"]
        score = f"F1 {m['f1']:.2f}" if "f1" in m else f"accuracy {m.get('accuracy', 0):.2f}"
        logger.success("trained {} ({}, {} images) in {:.1f}s: {}", head, report["head_type"], report["images"],
                       time.perf_counter() - started, score)
        self._sort_inbox(head)

    # -- sorting -------------------------------------------------------------------------
    def _sort_all(self) -> None:
        for head in inbox_heads(self.inbox_dir):
            if self._stopping.is_set():
                return
            self._sort_inbox(head)

    def _checkpoint_damaged(self, head: str) -> bool:
        """True (and reported once, in the log and in status) when out/<head>.pt exists but cannot be read."""
        summary = self.checkpoints.summary(self.ws.checkpoint_path(head))
        error = summary.get("error") if summary else None
        self._problem(f"checkpoint {head}", error)
        return error is not None

    def _set_damaged_checkpoint_aside(self, head: str) -> None:
        """The user asked for a retrain over a damaged checkpoint: keep the damaged file, renamed."""
        path = self.ws.checkpoint_path(head)
        aside = unique_path(path.parent, f"{path.name}.damaged")
        os.rename(path, aside)
        logger.warning("head {}: damaged checkpoint kept as {}; training a new one", head, aside)
        self._problem(f"checkpoint {head}", None)

    def _sortable(self, head: str) -> str | None:
        """Why the head cannot sort now (checked without the worker), or None."""
        summary = self.checkpoints.summary(self.ws.checkpoint_path(head))
        if summary is None:
            return f"head '{head}' is not trained yet"
        if self._checkpoint_damaged(head):
            return summary["error"]
        model = self._model()
        if model is None:
            return "no active model"
        if summary["model"] != model.name:
            return (f"head '{head}' was trained with model '{summary['model']}' but the active model is "
                    f"'{model.name}'")
        return None

    def _verdicts(self, head: str, paths: list[Path]) -> list[Verdict]:
        """The worker's decisions for `paths`; a file that crashes the worker twice is rejected."""
        results, crashed = self._call_per_file("decide", paths, head=head)
        out = [Verdict(Path(p), bucket, hash_, score) for r in results for p, bucket, hash_, score in r["decisions"]]
        out += [Verdict(Path(p), REJECTED, None, None, reason) for r in results for p, reason in r["unusable"]]
        out += [Verdict(p, REJECTED, None, None, CRASHED) for p in crashed]
        return out

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
        if (why := self._sortable(head)) is not None:
            self._tell_once(f"wait:{head}:{why}", f"inbox/{head}: {len(ready)} file(s) wait: {why}")
            return
        dry_run = self.config.inbox.dry_run
        if dry_run:  # files stay in the inbox: report each version of a file once
            ready = [f for f in ready if self._dry_key(f) not in self._dry_reported]
            if not ready:
                return
        self._set_activity(f"sorting {head}")
        try:
            result = sort_files(self.store, head, lambda paths: self._verdicts(head, paths), ready,
                                self.classified_dir / head, should_stop=self._stopping.is_set,
                                on_placed=self._placed, dry_run=dry_run, chunk=self.config.daemon.max_batch_images)
        except WorkerCrashed:
            raise
        except HeadmasterError as e:  # the worker cannot use the head (e.g. its checkpoint will not load)
            self._tell_once(f"wait:{head}:{e}", f"inbox/{head}: files wait: {e}")
            return
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
            return self.worker_call("rank_uncertain", head=head, limit=limit)
        if cmd == "suspects":
            head, folds, limit = request.get("head"), request.get("folds", 5), request.get("limit")
            if not isinstance(head, str) or not (isinstance(folds, int) and folds >= 2) \
                    or not (limit is None or isinstance(limit, int) and limit > 0):
                raise HeadmasterError("suspects needs 'head' (a string), an optional 'folds' (2 or more) and an "
                                      "optional positive 'limit'")
            return self.worker_call("suspects", head=head, folds=folds, limit=limit)
        raise HeadmasterError(f"unknown command {cmd!r} (commands: {', '.join(COMMANDS)})")

    def worker_call(self, op: str, **args: Any) -> Any:
        """A model-backed answer for hmctl or the review page: the worker's named operation (the worker
        uses the built-in `default` model when none is registered); waits while the worker is busy."""
        return self.worker.call(op, timeout=CALL_TIMEOUT_S, **args)

    def status(self) -> dict[str, Any]:
        """Everything `hmctl status` shows; reads a snapshot, never blocks on the worker."""
        model = None
        heads: dict[str, Any] = {}
        learned: dict[str, dict[str, int]] = {}
        try:
            with Store(self.ws.db_path) as store:
                try:
                    model = store.active_model().name
                except HeadmasterError:
                    pass
                for name in self.ws.head_names():
                    learned[name] = correction_counts(store, name)
        except HeadmasterError as e:
            self._problem("database", str(e))
        except sqlite3.DatabaseError as e:
            self._problem("database", damaged_message(self.ws.db_path, e))
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
            problems = dict(s.problems)
        for name, h in heads.items():
            if h["error"] and not h["trained"] and f"checkpoint {name}" not in problems \
                    and self.ws.checkpoint_path(name).exists():
                problems[f"checkpoint {name}"] = h["error"]
        return {
            "pid": os.getpid(),
            "rss_mib": rss_mib(),
            "uptime_s": round(time.time() - self.state.started, 1),
            "worker": self.worker.info(),
            "problems": problems,
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
