"""The Daemon (hmd's supervisor): watches the workspace, schedules work, moves files, answers hmctl.

hmd is two processes:
- this supervisor, which never imports torch or transformers (tests/test_daemon_worker.py pins it):
  watchdog, APScheduler, the control socket, the review page (headmaster/web, served from its
  own thread; its backend headmaster/web/review.py), the sort log and every file move
  (headmaster/daemon/inbox.py, fileops.py, and the page's labels, undos and exclusions);
- a worker process (headmaster/daemon/worker.py), started on demand through the hub's
  `worker` (headmaster/daemon/worker_client.py), which loads the model, decodes
  images, embeds, trains and scores, and exits after `[daemon] model_idle_seconds` without
  work. It returns decisions; it never moves a file.
The two talk over a socketpair with plain JSON messages (headmaster/daemon/protocol.py).
Any model-backed answer is a named call: `hub.worker.call("rank_uncertain", head=..., limit=...)`,
`hub.worker.call("suspects", head=..., folds=..., limit=...)`, the review page's `figures`,
and the job thread's `default_model`, `embed`, `train` and `decide`.

The supervisor's parts, each a module of its own; the Daemon here makes them and wires them
together, and keeps the life cycle (start, signals, reload, stop), the job loop and start-up:
- hub.py: what every part shares (config, workspace, job queue, scheduler, worker, headmaster.db);
- events.py: the watcher's sink and the timers it arms (settle checks, debounced retrains);
- calls.py: the job thread's worker calls, surviving crashes; the active model; embedding examples;
- retrain.py: a dirty head's retrain; sorter.py: sorting the inbox;
- library.py: keeping the [[library]] photo trees tagged (new photos, and changed decisions after a retrain);
- corrections.py: learning from corrections (also the review page's labels);
- answers.py: hmctl's commands and `hmctl status`, also what the review page asks;
- heartbeat.py: whether the job thread is moving; the systemd watchdog is pinged only while it is.

Who writes what in headmaster.db (WAL mode, busy timeout: both processes write safely):
- the supervisor: the sort log (`sorts`), the file index after a move or removal (`files`),
  `corrections` (learning), and `unusable` rows for files that crashed the worker twice;
- the worker: vectors (`embeddings`), file index rows of files it hashed, `unusable` rows for
  contents the model cannot read; and checkpoints in out/ (atomic writes, as `hm train`).

Threads in the supervisor and who does what:
- watchdog's observer thread classifies events and marks heads dirty (no I/O beyond stat; events.py);
- APScheduler's thread runs timers only: settle checks, debounced retrains, watchdog pings;
  each timer just queues work;
- one job thread does all real work in order (embed, train, sort), so a file is never sorted
  twice; it waits on the worker for decisions and moves the files itself;
- control threads answer the socket from a state snapshot (answers.py; model-backed answers
  wait for the worker, which does one thing at a time).
Nothing polls: every thread blocks until an event, a timer or a request wakes it.

Crashes: a worker that dies in a call (segfault, OOM kill, kill -9) is logged and restarted on
the next call; the files of the call that crashed are retried once each, on their own, and a
file that kills the worker again goes to `_rejected/` ("crashed the decoder") and is remembered
as unusable (calls.py). Damaged files of our own (headmaster.db, a checkpoint) are reported in
the log and in `hmctl status` under `problems`; nothing is deleted or overwritten to repair them.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sqlite3
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from loguru import logger

from headmaster import HeadmasterError
from headmaster.config import Config, load_config
from headmaster.daemon.answers import Answers
from headmaster.daemon.calls import Calls
from headmaster.daemon.control import ControlServer
from headmaster.daemon.corrections import Corrections
from headmaster.daemon.events import Events
from headmaster.daemon.hub import STOP, Hub, Task
from headmaster.daemon.inbox import resolve_leftovers
from headmaster.daemon.library import Libraries
from headmaster.daemon.logs import setup_logging
from headmaster.daemon.retrain import Retrainer
from headmaster.daemon.sorter import Sorter
from headmaster.daemon.state import needs_retrain
from headmaster.daemon.watcher import EVENTS, WorkspaceHandler, start_observer
from headmaster.daemon.worker_client import WorkerCrashed

STOP_GRACE_S = 8.0  # systemd's stop timeout is longer; we promise 10 s


class Daemon:
    def __init__(self, config: Config):
        hub = self.hub = Hub(config)
        self.events = Events(hub)
        self.calls = Calls(hub)
        self.sorter = Sorter(hub, self.events, self.calls)
        self.libraries = Libraries(hub, self.calls)
        self.retrainer = Retrainer(hub, self.events, self.calls, self.sorter, on_trained=self.libraries.retrained)
        self.corrections = Corrections(hub, self.events)
        self.answers = Answers(hub, reload=self.reload, web_status=self._web_status,
                               libraries=self.libraries.status, watchdog=self._watchdog_status)
        self.server: ControlServer | None = None
        self.observer = None
        self.jobs: threading.Thread | None = None
        self._wake = threading.Event()
        self._stop_asked = False
        self._reload_asked = False
        self._lock_fd: int | None = None
        self.web = None  # the review page's server (headmaster.web.server.WebServer), when [web] enabled
        self.review = None
        self.web_error: str | None = None
        self.watchdog_limit: float | None = None  # WATCHDOG_USEC in seconds, when systemd watches us
        self.watchdog_stalled: str | None = None  # why the pings stopped, while they are stopped

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
                except HeadmasterError:
                    pass  # logged by reload(); the old config stays
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
        hub = self.hub
        ws = hub.ws
        for folder in (ws.heads_dir, ws.out_dir, hub.classified_dir, hub.inbox_dir):
            folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        self._take_lock()
        self.server = ControlServer(hub.socket_path, self.answers.handle_request,
                                    on_bad_request=lambda: hub.state.count("bad_requests"))
        self.server.start()
        hub.scheduler.start()
        self._start_watchdog_pings()
        learning = hub.config.learning.from_corrections
        handler = WorkspaceHandler(ws.heads_dir, hub.inbox_dir, ws.out_dir, self.events,
                                   on_error=lambda e: logger.opt(exception=e).error("event handler failed"),
                                   classified_dir=hub.classified_dir if learning else None,
                                   libraries=self.libraries.roots())
        folders = [ws.heads_dir, hub.inbox_dir, ws.out_dir] + ([hub.classified_dir] if learning else [])
        observer = self.observer = start_observer(handler, folders)
        self.libraries.watch = lambda root: observer.schedule(handler, str(root), recursive=True, event_filter=EVENTS)
        self.libraries.unwatch = lambda watch: _unschedule(observer, watch)
        self.libraries.start()
        if hub.config.learning.confirm_after_days > 0:
            hub.scheduler.add_job(hub.tasks.put, "interval", args=[Task("confirm")], hours=1, id="confirm")
        self.jobs = threading.Thread(target=self._work, name="hmd-jobs", daemon=True)
        self.jobs.start()
        # ready now: the socket answers; the model loads in the worker when there is work for it
        hub.notifier.notify("READY=1")
        logger.info("hmd {} ready in {:.2f}s: workspace {}, inbox {}, socket {}", os.getpid(),
                    time.perf_counter() - started, ws.root, hub.inbox_dir, hub.socket_path)
        hub.tasks.put(Task("startup"))
        self._start_web()

    def stop(self) -> None:
        """Finish the file operation in flight, then stop everything (well within 10 s)."""
        hub = self.hub
        logger.info("stopping")
        hub.stopping.set()
        hub.notifier.notify("STOPPING=1")
        if self.observer is not None:
            self.observer.stop()
        if self.server is not None:
            self.server.stop()
        self._stop_web()
        if hub.scheduler.running:
            hub.scheduler.shutdown(wait=False)
        hub.tasks.put(STOP)
        hub.worker.close()  # a job waiting on the worker returns at once; no file is mid-move in the worker
        if self.jobs is not None:
            self.jobs.join(timeout=STOP_GRACE_S)
            if self.jobs.is_alive():
                logger.warning("the current job did not finish within {}s; exiting anyway", STOP_GRACE_S)
        if hub.store is not None and not (self.jobs and self.jobs.is_alive()):
            hub.store.close()
        logger.info("stopped")

    def _take_lock(self) -> None:
        """One daemon per workspace: an exclusive lock the kernel drops if we die."""
        root = self.hub.ws.root
        path = root / ".hmd.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise HeadmasterError(f"another hmd is already running on workspace {root} (lock {path})") \
                from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _start_watchdog_pings(self) -> None:
        """Ping systemd's watchdog at twice the rate it asks for, but only while the job thread is moving
        (daemon/heartbeat.py): a daemon whose work is stuck stops pinging, says why, and systemd restarts it."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return
        try:
            limit = int(usec) / 1e6
        except ValueError:
            logger.warning("WATCHDOG_USEC={!r} is not a number: not pinging the systemd watchdog", usec)
            return
        self.watchdog_limit = limit
        interval = max(0.5, limit / 2)
        self.hub.scheduler.add_job(self._watchdog_tick, "interval", seconds=interval, id="watchdog")
        logger.info("systemd watchdog: pinging every {:.1f}s while the work moves (limit {:.1f}s)", interval, limit)

    def _watchdog_tick(self) -> None:
        hub, limit = self.hub, self.watchdog_limit
        if limit is None or hub.stopping.is_set():
            return
        if self.jobs is None or not self.jobs.is_alive():
            why = "the job thread is not running"
        else:
            why = hub.heartbeat.check(limit, hub.worker.current_call(), hub.worker.pid)
        if why is None:
            if self.watchdog_stalled is not None:
                logger.warning("watchdog: the work moved on again; pinging systemd again")
            self.watchdog_stalled = None
            hub.notifier.notify("WATCHDOG=1")
            return
        if self.watchdog_stalled is None:  # said once, when the pings stop
            hub.state.count("watchdog_stalls")
            logger.error("watchdog: not pinging systemd: {}; systemd restarts hmd unless it moves on within {:.0f}s "
                         "(`kill -USR1 {}` dumps every thread's stack)", why, limit, os.getpid())
        self.watchdog_stalled = why

    def _watchdog_status(self) -> dict[str, Any]:
        """The job thread's task and, under a systemd watchdog, whether it is pinged (and why not)."""
        return {"job": self.hub.heartbeat.snapshot(),
                "watchdog": None if self.watchdog_limit is None else {
                    "limit_s": self.watchdog_limit, "pinging": self.watchdog_stalled is None,
                    "why_not": self.watchdog_stalled}}

    # -- the review page (headmaster/web), served from its own thread ----------------------
    def _start_web(self) -> None:
        web = self.hub.config.web
        if not web.enabled:
            return
        from headmaster.web import ReviewService, WebError, WebServer

        try:
            # the page's model work goes to the worker process; a label is learned at once, as a moved file is
            self.review = ReviewService(
                self.hub.ws, self.answers.worker_call, live=self.answers.status,
                teach=lambda store, head, bucket, path, hash_: self.corrections.teach(
                    head, bucket, path, hash_, "correction", store=store),
                libraries=list(self.hub.config.library))  # their queues; a label copies a photo into heads/
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
        """Re-read the config; timings, logging and training settings apply now, paths need a restart.

        A config that does not load changes nothing: HeadmasterError says why (hmctl reload prints it and
        exits 1, which fails `systemctl reload`: the units' ExecReload= runs hmctl), the log and
        `hmctl status` say so until a reload works. systemd hears RELOADING=1 and READY=1 around it.
        """
        hub = self.hub
        hub.notifier.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            new = load_config(hub.config.source, hub.ws.root)
        except HeadmasterError as e:
            hub.reload_error = str(e)
            logger.error("reload failed, keeping the old config: {}", e)
            hub.set_activity(hub.state.activity)  # STATUS= says so too
            hub.notifier.notify("READY=1")  # the reload is over: hmd runs on, on the old config
            raise HeadmasterError(f"reload failed, keeping the old config: {e}") from None
        setup_logging(new)
        restart = [key for key, old, now in (
            ("workspace", hub.ws.root, new.workspace_root), ("inbox.path", hub.inbox_dir, new.inbox_dir),
            ("daemon.socket", hub.socket_path, new.socket_path), ("daemon.device", hub.config.daemon.device,
                                                                  new.daemon.device),
            ("library", [lib.to_dict() for lib in hub.config.library], [lib.to_dict() for lib in new.library]))
            if old != now]
        hub.config = new
        hub.settler.settle_seconds = new.daemon.settle_seconds
        hub.worker.set_idle_seconds(new.daemon.model_idle_seconds)
        hub.reload_error = None
        if restart:
            logger.warning("config reloaded; restart hmd to apply: {}", ", ".join(restart))
        else:
            logger.info("config reloaded from {}", new.source or "defaults")
        hub.set_activity(hub.state.activity)
        hub.notifier.notify("READY=1")
        return {"config": str(new.source) if new.source else None, "restart_needed": restart}

    # -- the job thread ------------------------------------------------------------------
    def _work(self) -> None:
        hub = self.hub
        while True:
            hub.heartbeat.idle()  # waiting on an empty queue is never stuck
            task = hub.tasks.get()
            if task is STOP or hub.stopping.is_set():
                return
            hub.heartbeat.begin(task.kind)
            try:
                hub.set_activity(task.kind)
                if hub.store_ready():
                    self._do(task)
            except WorkerCrashed as e:
                if hub.stopping.is_set():
                    return
                hub.state.count("errors")
                logger.error("{}: {}", task.kind, e)
            except HeadmasterError as e:
                hub.state.count("errors")
                logger.error("{}: {}", task.kind, e)
            except sqlite3.DatabaseError as e:  # damaged while we ran: report it, stop using it, keep running
                hub.state.count("errors")
                hub.database_lost(e)
            except Exception:
                hub.state.count("errors")
                logger.exception("{} failed", task.kind)
            finally:
                hub.set_activity("idle" if hub.tasks.empty() else "busy")

    def _do(self, task: Task) -> None:
        if task.kind == "startup":
            self._startup()
        elif task.kind == "rescan":
            self._reconcile()
            self.sorter.sort_all()
            self.libraries.queue_all()
        elif task.kind == "library":
            self.libraries.scan(task.paths[0])
        elif task.kind == "library_gone":
            self.libraries.forget(task.paths[0])
        elif task.kind == "settled":
            self._settled(task.paths)
        elif task.kind == "retrain":
            self.retrainer.retrain(task.head, task.force)
        elif task.kind == "sort":  # a checkpoint was written (by us or by `hm train`)
            self.sorter.sort_inbox(task.head)
            self.libraries.retrained(task.head)
        elif task.kind == "forget":
            self.hub.store.forget_files(str(p) for p in task.paths)
        elif task.kind == "confirm":
            self.corrections.confirm()

    # -- start-up and what changed while we were away --------------------------------------
    def _startup(self) -> None:
        hub = self.hub
        hub.set_activity("reconciling")
        left = resolve_leftovers(hub.store, hub.inbox_dir, hub.classified_dir)
        if left.temps:
            logger.info("removed {} temporary file(s) left by an interrupted move", left.temps)
        for dup, kept in left.duplicates:
            logger.info("{} was already sorted to {}: removed the inbox copy", dup, kept)
        hub.state.count("duplicates_resolved", len(left.duplicates))
        self._reconcile()
        self.sorter.sort_all()
        self.libraries.queue_all()  # tagged after the inbox is sorted, each library one task
        if hub.config.learning.confirm_after_days > 0:
            self.corrections.confirm()
        logger.info("start-up checks done: {} head(s), {} file(s) waiting in the inbox", len(hub.ws.head_names()),
                    hub.queued_total())
        if not hub.ws.head_names():
            logger.info("no heads yet: make {}/<head>/<bucket>/ folders and drop example photos in them; hmd then "
                        "trains each head and sorts what lands in {}/<head>/", hub.ws.heads_dir, hub.inbox_dir)

    def _reconcile(self) -> None:
        """Find what changed while we were not watching: stat-only against the file index."""
        hub = self.hub
        ws = hub.ws
        live = {str(p) for name in ws.head_names() for p, _ in ws.head(name).labelled_images()}
        gone = [r.path for r in hub.store.files_under(str(ws.heads_dir) + os.sep) if r.path not in live]
        if gone:
            hub.store.forget_files(gone)
            logger.info("{} example(s) removed while hmd was down", len(gone))
        model = self.calls.model() if ws.head_names() else None  # no heads: no model to prepare yet
        for name in ws.head_names():
            (hub.inbox_dir / name).mkdir(parents=True, exist_ok=True)
            if model is None or hub.stopping.is_set():
                continue
            self.calls.embed(model, [p for p, _ in ws.head(name).labelled_images()], name)
            if self.sorter.checkpoint_damaged(name):
                continue
            fresh = needs_retrain(ws, name, model.name)
            if fresh.retrain:
                logger.info("head {}: {}: retraining", name, fresh.reason)
                hub.state.mark_dirty(name, 0.0, 0.0)  # shows as pending until the worker gets to it
                hub.tasks.put(Task("retrain", name))

    def _settled(self, paths: tuple[Path, ...]) -> None:
        """Files that stopped changing: new examples get vectors, corrections are learned, the inbox sorts."""
        hub = self.hub
        examples: dict[str, list[Path]] = defaultdict(list)
        inbox: set[str] = set()
        corrected: list[Path] = []
        photos: list[Path] = []
        for p in paths:
            if (parts := _parts(p, hub.ws.heads_dir)) is not None:
                examples[parts[0]].append(p)
            elif (parts := _parts(p, hub.inbox_dir)) is not None:
                inbox.add(parts[0])
            elif (parts := _parts(p, hub.classified_dir)) is not None:
                if len(parts) == 3:
                    corrected.append(p)
            else:
                photos.append(p)  # under a [[library]] root (the only other folders watched)
        if corrected:
            self.corrections.learn(corrected)
        model = self.calls.model() if examples else None
        for head, files in examples.items():
            if model is not None:
                self.calls.embed(model, files, head)
        for head in sorted(inbox):
            self.sorter.sort_inbox(head, settled=set(paths))
        if photos:
            self.libraries.settled(photos)


def _unschedule(observer, watch) -> None:
    try:
        observer.unschedule(watch)
    except (KeyError, OSError):  # the kernel dropped the watch with the folder already
        pass


def _parts(path: Path, root: Path) -> tuple[str, ...] | None:
    try:
        return path.relative_to(root).parts or None
    except ValueError:
        return None
