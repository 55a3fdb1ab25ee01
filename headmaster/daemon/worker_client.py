"""The supervisor's handle on the worker process: start on demand, call by name, stop when idle, survive crashes.

`WorkerClient.call("decide", head="colour", paths=[...])` starts the worker if it is not
running, sends one request (headmaster/daemon/protocol.py) and waits for its answer.
Calls are serialised: the worker does one thing at a time, whoever asks (the job thread,
a control request such as `hmctl uncertain`, the review page). After `idle_seconds`
without a call the worker is told to go (its stream is closed, it exits and its memory,
the model included, goes back to the system); 0 keeps it running.

`prestart(head=...)` starts a sleeping worker and warms it (the `warm` op: the model loaded and
run once, the head's checkpoint loaded) on a thread of its own, without waiting: hmd does this
when the first new file lands in the inbox, so the worker gets ready while the file settles
(a call made meanwhile waits for the warm-up, as for any call in flight).

When the worker dies during a call (a segfault in a decoder, the OOM killer, kill -9),
the call raises WorkerCrashed and the next call starts a fresh worker. What to retry
is the caller's decision (headmaster/daemon/calls.py retries each file once).
This module imports nothing heavy: it runs in the supervisor.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from loguru import logger

from headmaster import HeadmasterError
from headmaster.daemon.heartbeat import WorkerCall
from headmaster.daemon.protocol import WorkerGone, receive, send
from headmaster.daemon.state import iso

STOP_WAIT_S = 3.0  # a worker told to go gets this long before SIGKILL
SUPERVISOR_ONLY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


class WorkerCrashed(HeadmasterError):
    """The worker process died while it handled a call."""


class WorkerBug(HeadmasterError):
    """The worker answered with an unexpected error (a bug, logged in full on the worker's stderr)."""


def rss_mib(pid: int | str = "self") -> float | None:
    """Resident memory of a process in MiB (Linux /proc; None elsewhere or when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else -returncode
        hint = " (kill -9 or the kernel's out-of-memory killer)" if -returncode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exited with status {returncode}"


class WorkerClient:
    def __init__(self, setup: dict[str, Any], idle_seconds: float):
        self.setup = setup  # JSON for the worker: workspace, device, backend, max_pixels
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()  # one call at a time
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._timer: threading.Timer | None = None
        self._closed = False
        self.started_at: float | None = None  # wall-clock start of the running worker
        self.loaded_since: float | None = None  # wall-clock time the running worker first reported its model loaded
        self.last_used = time.monotonic()
        self.in_flight: str | None = None
        self.in_flight_since: float | None = None  # monotonic start of the call in flight
        self._warming: threading.Thread | None = None  # prestart's thread while it runs
        self._prestart_lock = threading.Lock()
        self.warmups = 0
        self.starts = 0
        self.crashes = 0
        self.idle_exits = 0
        self.last_crash: str | None = None

    # -- calls -----------------------------------------------------------------------
    def call(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        """Run `op` in the worker and return its result; waits at most `timeout` s for the worker to be free."""
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            raise HeadmasterError(f"hmd's worker is busy ({self.in_flight or 'working'}); try again "
                                  f"(not free within {timeout:.0f}s)")
        try:
            if self._closed:
                raise WorkerCrashed("hmd is stopping")
            self._cancel_timer()
            sock, proc = self._ensure_started()
            self.in_flight, self.in_flight_since = op, time.monotonic()
            sent = time.time()
            try:
                send(sock, {"op": op, "args": args})
                reply = receive(sock)
            except (WorkerGone, OSError):
                why = self._reap(proc)
                if self._closed:
                    raise WorkerCrashed("hmd is stopping") from None
                self.crashes += 1
                self.last_crash = f"{iso(time.time())}: pid {proc.pid} {why} during '{op}'"
                raise WorkerCrashed(f"the worker (pid {proc.pid}) {why} during '{op}'") from None
            finally:
                self.in_flight = self.in_flight_since = None
            if reply.get("loaded") and self.loaded_since is None:
                self.loaded_since = time.time()
            self._log_call(proc.pid, op, args, sent, reply)
            self.last_used = time.monotonic()
            self._arm_timer()
            if reply.get("ok"):
                return reply.get("result")
            if reply.get("kind") == "bug":
                raise WorkerBug(f"worker error in '{op}': {reply.get('error')}")
            raise HeadmasterError(reply.get("error") or f"'{op}' failed in the worker")
        finally:
            self._lock.release()

    # -- getting ready before the first call ------------------------------------------
    def prestart(self, **warm_args: Any) -> bool:
        """Start and warm the worker on a thread of its own unless it is running with its model, being started,
        or busy (a call in flight brings it up anyway). Returns at once: True if a warm-up was started."""
        if self._closed or (self._proc is not None and self.loaded_since is not None) or self._lock.locked():
            return False
        with self._prestart_lock:
            if self._warming is not None and self._warming.is_alive():
                return False
            self._warming = threading.Thread(target=self._warm, kwargs=warm_args, name="hmd-warm", daemon=True)
            self.warmups += 1
            self._warming.start()
        return True

    def _warm(self, **args: Any) -> None:
        try:
            result = self.call("warm", **args)
            logger.info("worker warmed up: model {} loaded and run once{} in {:.2f}s", result["model"],
                        ", head checkpoint loaded" if result["head"] else "", result["seconds"])
        except (WorkerCrashed, WorkerBug) as e:
            if not self._closed:
                logger.warning("worker warm-up failed: {}", e)
        except HeadmasterError as e:  # e.g. no usable model yet: the sorter's own call says so where it matters
            logger.debug("worker warm-up: {}", e)

    def _log_call(self, pid: int, op: str, args: dict[str, Any], sent: float, reply: dict[str, Any]) -> None:
        """Where a request's time went, for the log: the worker's set-up (first answer), then the call."""
        if (ready := reply.get("ready_at")) is not None and self.started_at is not None:
            logger.info("worker (pid {}) set up {:.2f}s after its start (interpreter, imports, database)", pid,
                        ready - self.started_at)
        t = reply.get("timings") or {}
        files = f" {len(args['paths'])} file(s)" if isinstance(args.get("paths"), list) else ""
        detail = (f": model load {t['load_seconds']:.2f}s, decode+forward {t['embed_seconds']:.2f}s of "
                  f"{t['embedded']} new, embed_paths {t['seconds']:.2f}s ({t['hashed']} hashed)") if t else ""
        logger.debug("worker {}{} in {:.2f}s{}", op, files, time.time() - sent, detail)

    # -- process life cycle ----------------------------------------------------------
    def _ensure_started(self) -> tuple[socket.socket, subprocess.Popen]:
        if self._proc is not None and self._proc.poll() is None and self._sock is not None:
            return self._sock, self._proc
        self._drop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "headmaster.daemon.worker", "--fd", str(theirs.fileno()),
                 "--setup", json.dumps(self.setup)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True,
                env={k: v for k, v in os.environ.items() if k not in SUPERVISOR_ONLY_ENV})
        except OSError as e:
            ours.close()
            raise HeadmasterError(f"cannot start the worker process: {e.strerror or e}") from None
        finally:
            theirs.close()
        self._proc, self._sock = proc, ours
        self.started_at, self.loaded_since = time.time(), None
        self.starts += 1
        logger.info("worker started (pid {})", proc.pid)
        return ours, proc

    def _reap(self, proc: subprocess.Popen) -> str:
        """The worker's stream ended: collect the process and say how it ended."""
        try:
            proc.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:  # it closed the stream but lives on: make sure it is gone
            proc.kill()
            proc.wait()
        why = describe_exit(proc.returncode)
        self._drop()
        return why

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self._proc = None, None
        self.started_at = self.loaded_since = None

    def _stop_process(self) -> None:
        """Tell the worker to go (end of stream), then make sure it went. Call with the lock held or closing."""
        proc, sock = self._proc, self._sock
        if proc is None:
            return
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            proc.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._drop()

    def _arm_timer(self) -> None:
        if self.idle_seconds <= 0:
            return
        self._timer = threading.Timer(self.idle_seconds, self._idle_check)
        self._timer.daemon = True
        self._timer.start()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle_check(self) -> None:
        if not self._lock.acquire(blocking=False):
            return  # a call is running; it re-arms the timer when it ends
        try:
            idle = time.monotonic() - self.last_used
            if self._closed or self._proc is None or self.idle_seconds <= 0:
                return
            if idle + 0.05 < self.idle_seconds:  # idle_seconds was raised by a reload: wait the rest
                self._timer = threading.Timer(self.idle_seconds - idle, self._idle_check)
                self._timer.daemon = True
                self._timer.start()
                return
            pid = self._proc.pid
            self._stop_process()
            self.idle_exits += 1
            logger.info("worker (pid {}) idle for {:.0f}s: stopped, model unloaded", pid, idle)
        finally:
            self._lock.release()

    def set_idle_seconds(self, seconds: float) -> None:
        """A reload changed model_idle_seconds: an idle worker now times out on the new setting."""
        self.idle_seconds = seconds
        if self._lock.acquire(blocking=False):  # busy: the call in flight arms the timer when it ends
            try:
                self._cancel_timer()
                if self._proc is not None and not self._closed:
                    self._arm_timer()
            finally:
                self._lock.release()

    def close(self) -> None:
        """Stop for good (hmd is stopping): a call in flight ends with WorkerCrashed('hmd is stopping')."""
        self._closed = True
        self._cancel_timer()
        proc, sock = self._proc, self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a call blocked on the answer
            except OSError:
                pass
        if proc is not None and proc.poll() is None:
            try:
                proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=STOP_WAIT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()

    # -- what status shows -------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def current_call(self) -> WorkerCall | None:
        """The call in flight and the process serving it, for the watchdog (headmaster/daemon/heartbeat.py)."""
        op, since, proc = self.in_flight, self.in_flight_since, self._proc
        if op is None or since is None or proc is None:
            return None
        return WorkerCall(op, proc.pid, since)

    def info(self) -> dict[str, Any]:
        """A snapshot for `hmctl status`; never waits for a call to finish."""
        pid, started, loaded = self.pid, self.started_at, self.loaded_since
        return {"running": pid is not None, "pid": pid, "since": iso(started) if pid else None,
                "model_loaded": bool(pid and loaded), "model_loaded_since": iso(loaded) if pid and loaded else None,
                "rss_mib": rss_mib(pid) if pid else None, "busy": self.in_flight,
                "idle_seconds": self.idle_seconds, "starts": self.starts, "warmups": self.warmups,
                "crashes": self.crashes, "idle_exits": self.idle_exits, "last_crash": self.last_crash}
