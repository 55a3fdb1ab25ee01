"""Is hmd's work moving? The job thread's heartbeat, which the systemd watchdog ping is tied to.

The job thread (headmaster/daemon/service.py) says when it takes a task (`begin`), when a long
task moves on (`beat`: each worker call that returns, each inbox file placed) and when it goes
back to waiting for work (`idle`). `check` says whether that is fresh: a thread waiting on an
empty queue is fine however long it waits; a task is fine while it moved within the watchdog
interval.

A worker call can take long for good reasons (a big retrain, the first model load), so while
the worker process is in a call its own progress counts too, judged from outside through
/proc/<pid>/stat: the call is moving while the worker is not stopped and its CPU time (user +
system, all threads) went up since the last look. A worker stopped with SIGSTOP, or blocked
for good (a deadlock, a hung read), uses no CPU time and so stops counting; a busy one counts
whatever it is busy with. Nothing here imports torch; it runs in the supervisor.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

STATES = {"R": "running", "S": "sleeping", "D": "in uninterruptible I/O", "T": "stopped (SIGSTOP)",
          "t": "stopped by a debugger", "Z": "exited (a zombie)", "X": "exited", "I": "idle"}
STOPPED = frozenset("TtZX")  # states in which a process makes no progress whatever its CPU time says


@dataclass(frozen=True)
class ProcessSample:
    state: str  # one letter, as /proc/<pid>/stat gives it
    cpu_ticks: int  # user + system time of every thread, in clock ticks

    @property
    def described(self) -> str:
        return STATES.get(self.state, f"state {self.state}")


def sample_process(pid: int) -> ProcessSample | None:
    """The state and CPU time of a process (Linux /proc); None when it is gone or /proc is not there."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = data[data.rfind(")") + 2 :].split()  # the command name, in (), may hold spaces
    try:
        return ProcessSample(fields[0], int(fields[11]) + int(fields[12]))  # utime, stime
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class WorkerCall:
    """The worker call in flight, as the watchdog sees it."""
    op: str
    pid: int
    since: float  # monotonic time the call began


class Heartbeat:
    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 sample: Callable[[int], ProcessSample | None] = sample_process):
        self._clock = clock
        self._sample = sample
        self._lock = threading.Lock()
        now = clock()
        self.task: str | None = "start-up"  # None while the job thread waits for work
        self.task_since = now
        self.moved = now  # the last sign of progress
        self._seen: tuple[int, int] | None = None  # (worker pid, its CPU ticks) at the last look

    # -- the job thread says what it does ----------------------------------------------------
    def begin(self, task: str) -> None:
        with self._lock:
            self.task, self.task_since = task, self._clock()
            self.moved = self.task_since

    def beat(self) -> None:
        with self._lock:
            self.moved = self._clock()

    def idle(self) -> None:
        with self._lock:
            self.task, self.task_since = None, self._clock()
            self.moved = self.task_since

    # -- the watchdog looks ------------------------------------------------------------------
    def look_at_worker(self, call: WorkerCall | None, pid: int | None) -> None:
        """Count the worker's progress in a call as the job thread's (see the module's docstring).
        `pid` is the running worker's (in a call or not), so the next look has something to compare."""
        if pid is None:
            self._seen = None
            return
        sample = self._sample(pid)
        if sample is None:
            return
        before, self._seen = self._seen, (pid, sample.cpu_ticks)
        if call is None or call.pid != pid:
            return
        new = before is None or before[0] != pid  # a worker we had not seen: just started for this call
        if sample.state not in STOPPED and (new or sample.cpu_ticks > before[1]):
            self.beat()

    def check(self, limit: float, call: WorkerCall | None = None, pid: int | None = None) -> str | None:
        """None while the job thread waits for work or moved within `limit` seconds; else why not, in one line."""
        self.look_at_worker(call, pid)
        with self._lock:
            task, since, moved = self.task, self.task_since, self.moved
        now = self._clock()
        if task is None or now - moved < limit:
            return None
        why = f"the job thread has been on '{task}' for {now - since:.0f}s and has not moved for {now - moved:.0f}s"
        if call is not None:
            sample = self._sample(call.pid)
            state = f"is {sample.described}" if sample is not None else "is gone"
            why += (f": it waits for the worker (pid {call.pid}) in '{call.op}' (for {now - call.since:.0f}s), which "
                    f"{state} and has used no CPU time since")
        return why

    def snapshot(self) -> dict[str, object]:
        """What `hmctl status` shows: the current task (None: waiting for work) and how long since it moved."""
        with self._lock:
            task, since, moved = self.task, self.task_since, self.moved
        now = self._clock()
        return {"task": task, "for_s": round(now - since, 1), "moved_s_ago": round(now - moved, 1)}
