"""What every part of the Daemon shares: the config, the workspace, the job queue, the worker, headmaster.db.

One Hub per hmd, made by the Daemon (headmaster/daemon/service.py) and handed to each part
(events.py, calls.py, corrections.py, sorter.py, retrain.py, answers.py) when it is made; a
part keeps no copy of what may change: `config` is replaced on reload and `store`, the
supervisor's own connection to headmaster.db, is None while the database is unusable.
Beside the resources, the small bookkeeping every part does: the status line, problems
with our own files, and warnings said once.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path

import sdnotify
from apscheduler.schedulers.background import BackgroundScheduler
from loguru import logger

from headmaster import HeadmasterError
from headmaster.config import Config
from headmaster.curation import ensure_schema
from headmaster.daemon.heartbeat import Heartbeat
from headmaster.daemon.inbox import inbox_files, inbox_heads
from headmaster.daemon.state import DaemonState
from headmaster.daemon.watcher import Settler, reports_closes
from headmaster.daemon.worker_client import WorkerClient
from headmaster.heads import CheckpointCache
from headmaster.store import Store, damaged_message
from headmaster.workspace import Workspace


@dataclass(frozen=True)
class Task:
    kind: str  # startup | settled | retrain | sort | forget | rescan | confirm | library | library_gone
    head: str | None = None
    paths: tuple[Path, ...] = ()
    force: bool = False


STOP = Task("stop")  # tells the job thread to return


class Hub:
    def __init__(self, config: Config):
        self.config = config  # replaced by Daemon.reload: read it where it is used
        self.ws = Workspace(config.workspace_root)
        self.inbox_dir = config.inbox_dir
        self.classified_dir = self.ws.classified_dir
        self.socket_path = config.socket_path
        self.state = DaemonState()
        self.heartbeat = Heartbeat()  # the job thread's: the systemd watchdog is pinged only while it is fresh
        self.reload_error: str | None = None  # why the last reload failed (the old config is kept), until one works
        self.settler = Settler(config.daemon.settle_seconds, reports_closes())
        self.checkpoints = CheckpointCache()
        self.tasks: queue.Queue[Task] = queue.Queue()
        self.scheduler = BackgroundScheduler(
            timezone=timezone.utc,
            job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 1})
        self.notifier = sdnotify.SystemdNotifier()
        self.store: Store | None = None  # the supervisor's own connection; None while headmaster.db is unusable
        self.worker = WorkerClient({"workspace": str(self.ws.root), "device": config.daemon.device,
                                    "backend": config.embedding.backend,
                                    "max_pixels": config.embedding.max_pixels},
                                   config.daemon.model_idle_seconds)
        self.stopping = threading.Event()
        self.told: set[str] = set()  # messages logged once until the situation changes

    # -- the status line and the log ------------------------------------------------------
    def set_activity(self, activity: str) -> None:
        with self.state.lock:
            self.state.activity = activity
            paused = " (sorting paused)" if self.state.paused else ""
            line = f"{activity}{paused}; sorted {self.state.sorted}, rejected {self.state.rejected}"
        if self.reload_error:
            line += f"; last reload failed, old config kept: {self.reload_error}"
        self.notifier.notify(f"STATUS={line}")

    def tell_once(self, key: str, message: str) -> bool:
        """Log a warning the first time a situation occurs; True if it was new."""
        if key in self.told:
            return False
        self.told.add(key)
        logger.warning(message)
        return True

    def problem(self, key: str, message: str | None) -> None:
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

    def queued_total(self) -> int:
        return sum(len(inbox_files(self.inbox_dir / h)) for h in inbox_heads(self.inbox_dir))

    # -- our own files: the database ----------------------------------------------------
    def store_ready(self) -> bool:
        """Open headmaster.db if it is not open; a damaged one is reported (log, status), never touched."""
        if self.store is not None:
            return True
        try:
            store = Store(self.ws.db_path)
            ensure_schema(store)
        except HeadmasterError as e:
            self.problem("database", str(e))
            return False
        except sqlite3.DatabaseError as e:
            self.problem("database", damaged_message(self.ws.db_path, e))
            return False
        self.store = store
        self.problem("database", None)
        return True

    def database_lost(self, error: Exception) -> None:
        self.problem("database", damaged_message(self.ws.db_path, error))
        if self.store is not None:
            self.store.close()
            self.store = None  # the next job (or `hmctl rescan`) tries again
