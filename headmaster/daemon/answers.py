"""What hmctl and the review page get: the control commands, model-backed answers and `hmctl status`.

Runs on the control socket's threads (headmaster/daemon/control.py) and the page's. Commands
that change something only queue a Task or flip a flag; `status` reads a snapshot and never
blocks on the worker; `uncertain`, `suspects` and the page's figures wait for the worker,
which does one thing at a time.
"""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any, Callable

from loguru import logger

from headmaster import HeadmasterError
from headmaster.curation import correction_counts
from headmaster.daemon.hub import Hub, Task
from headmaster.daemon.inbox import inbox_files, inbox_heads
from headmaster.daemon.state import iso
from headmaster.daemon.worker_client import rss_mib
from headmaster.heads import head_fields
from headmaster.store import Store, damaged_message

COMMANDS = ("status", "retrain", "rescan", "pause", "resume", "reload", "uncertain", "suspects", "ping")
CALL_TIMEOUT_S = 120.0  # how long a control request waits for the worker to be free


class Answers:
    def __init__(self, hub: Hub, reload: Callable[[], dict[str, Any]],
                 web_status: Callable[[], dict[str, Any] | None],
                 libraries: Callable[[], list[dict[str, Any]]] = list,
                 watchdog: Callable[[], dict[str, Any]] = dict):
        self.libraries = libraries  # per [[library]]: path, heads, photos, tagged, pending, failed, paused
        self.watchdog = watchdog  # the job thread's task ("job") and the systemd watchdog's pings ("watchdog")
        self.hub = hub
        self.reload = reload  # the Daemon's: re-reads the config
        self.web_status = web_status  # the review page's address, or why it is not served

    def handle_request(self, request: dict[str, Any]) -> Any:
        hub = self.hub
        cmd = request["cmd"]
        if cmd == "ping":
            return {"pong": True, "pid": os.getpid()}
        if cmd == "status":
            return self.status()
        if cmd == "retrain":
            head = request.get("head")
            if head is not None and not isinstance(head, str):
                raise HeadmasterError("'head' must be a string")
            names = [hub.ws.head(head).name] if head else hub.ws.head_names()
            for name in names:
                hub.tasks.put(Task("retrain", name, force=True))
            return {"queued": names}
        if cmd == "rescan":
            hub.tasks.put(Task("rescan"))
            return {"queued": True}
        if cmd in ("pause", "resume"):
            with hub.state.lock:
                hub.state.paused = cmd == "pause"
            logger.info("sorting {}", "paused" if cmd == "pause" else "resumed")
            if cmd == "resume":
                for head in inbox_heads(hub.inbox_dir):
                    hub.tasks.put(Task("sort", head))
            hub.set_activity(hub.state.activity)
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
        return self.hub.worker.call(op, timeout=CALL_TIMEOUT_S, **args)

    def status(self) -> dict[str, Any]:
        """Everything `hmctl status` shows; reads a snapshot, never blocks on the worker."""
        hub = self.hub
        ws = hub.ws
        model = None
        heads: dict[str, Any] = {}
        learned: dict[str, dict[str, int]] = {}
        try:
            with Store(ws.db_path) as store:
                try:
                    model = store.active_model().name
                except HeadmasterError:
                    pass
                for name in ws.head_names():
                    learned[name] = correction_counts(store, name)
        except HeadmasterError as e:
            hub.problem("database", str(e))
        except sqlite3.DatabaseError as e:
            hub.problem("database", damaged_message(ws.db_path, e))
        for name in ws.head_names():
            try:
                labelled = ws.head(name)
            except HeadmasterError:
                continue  # deleted while we looked
            ck = hub.checkpoints.summary(ws.checkpoint_path(name)) or {}
            with hub.state.lock:
                h = hub.state.head(name)
                info = {"retrains": h.retrains, "pending_retrain": h.pending, "next_retrain": iso(h.next_retrain),
                        "training": h.training, "error": h.last_error or ck.get("error"),
                        "corrections": h.corrections}
            heads[name] = {
                **head_fields(labelled, ck),
                **info,
                "waiting": len(inbox_files(hub.inbox_dir / name)),
                "examples_from_corrections": learned.get(name, {}).get("examples", 0),
            }
        with hub.state.lock:
            s = hub.state
            counters = {"sorted": s.sorted, "rejected": s.rejected}
            extra = {"paused": s.paused, "activity": s.activity, "errors": s.errors,
                     "unreadable_examples": s.unreadable_examples, "bad_requests": s.bad_requests,
                     "duplicates_resolved": s.duplicates_resolved, "watchdog_stalls": s.watchdog_stalls}
            problems = dict(s.problems)
        for name, h in heads.items():
            if h["error"] and not h["trained"] and f"checkpoint {name}" not in problems \
                    and ws.checkpoint_path(name).exists():
                problems[f"checkpoint {name}"] = h["error"]
        return {
            "pid": os.getpid(),
            "rss_mib": rss_mib(),
            "uptime_s": round(time.time() - hub.state.started, 1),
            "worker": hub.worker.info(),
            "problems": problems,
            "model": model,
            "workspace": str(ws.root),
            "config": str(hub.config.source) if hub.config.source else None,
            "socket": str(hub.socket_path),
            "heads": heads,
            "inbox": {"path": str(hub.inbox_dir), "queued": hub.queued_total(), **counters},
            "settling": len(hub.settler),
            "queued_tasks": hub.tasks.qsize(),
            "web": self.web_status(),
            "libraries": self.libraries(),
            "reload_error": hub.reload_error,
            **self.watchdog(),
            **extra,
        }
