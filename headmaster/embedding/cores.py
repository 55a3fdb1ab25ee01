"""How the forward pass and the file workers (hashing, decoding) share the CPU's cores.

On a GPU the forward pass runs on the device and the workers overlap it freely. On a CPU both
want the same cores, and torch's intra-op threads wait for each other at every operation: a
decode thread running beside a forward pass that uses every core slows both. Two ways out:

- turns: the forward pass gets every core; workers pause while it runs and use every core between.
- split: the forward pass keeps `cores - k` threads; `k` workers run beside it all the time.

Which is faster depends on how well the forward pass scales over cores and on what else the
machine is doing (on a busy machine a team of intra-op threads stalls whenever one of them is
descheduled), so `CoreShare` starts with turns (the faster one on an otherwise idle machine), tries
split after a few batches, keeps the faster one and re-checks now and then. Short runs (up to six
batches) never pay for the experiment.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator

TURNS = "turns"
SPLIT = "split"


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _torch():
    import torch  # only where the forward pass is torch's: neither ONNX Runtime nor hmd's hashing imports it

    return torch


class CoreShare:
    """A gate between the forward pass (`forward()`) and file workers (`working()`), plus the mode chooser.

    Disabled (GPU, or `enabled=False`) it lets everything overlap and changes no thread settings.
    `mode` forces one mode instead of measuring. `torch_threads=False` (ONNX Runtime, whose session
    keeps the thread count it was made with) never touches torch and takes turns only.
    """

    RECHECK_EVERY = 12  # batches between two looks at the other mode
    FIRST_TRY = 6  # batches of turns before split is tried (two batches)

    def __init__(self, enabled: bool, cores: int | None = None, mode: str | None = None, torch_threads: bool = True):
        self.enabled = enabled
        self.torch_threads = torch_threads
        if not torch_threads:
            mode = TURNS
        self.cores = cores or cpu_cores()
        self.side_workers = max(1, self.cores // 4)  # split: workers beside the forward pass
        self.modes = [TURNS] if self.cores < 2 else [TURNS, SPLIT]
        self.forced = mode
        # disabled (e.g. hashing in hmd's supervisor) or not torch's forward pass: no torch import
        self._torch_threads = _torch().get_num_threads() if enabled and torch_threads else 0
        self._cond = threading.Condition()
        self._forward_running = False
        self._active = 0
        self._allowed_during_forward = 0
        self._seconds_per_image: dict[str, float] = {}
        self._batches = 0
        self._last_end: float | None = None
        self.mode = mode or TURNS
        self.history: list[tuple[str, float]] = []  # (mode, seconds per image) of every measured batch

    # -- the gate ---------------------------------------------------------------------------------
    @contextmanager
    def working(self) -> Iterator[None]:
        """Around one file's hashing or decoding."""
        if not self.enabled:
            yield
            return
        with self._cond:
            self._cond.wait_for(lambda: not self._forward_running or self._active < self._allowed_during_forward)
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    @contextmanager
    def forward(self, images: int) -> Iterator[None]:
        """Around one batch's forward pass: picks the mode, sets the threads, times the whole cycle."""
        if not self.enabled:
            yield
            return
        mode = self._next_mode()
        if self.torch_threads:
            _torch().set_num_threads(self.cores if mode == TURNS else self.cores - self.side_workers)
        with self._cond:
            self._allowed_during_forward = 0 if mode == TURNS else self.side_workers
            self._forward_running = True
            self._cond.wait_for(lambda: self._active <= self._allowed_during_forward)
        try:
            yield
        finally:
            with self._cond:
                self._forward_running = False
                self._cond.notify_all()
            self._record(mode, images)

    def close(self) -> None:
        """Give torch back the thread count it had."""
        if self.enabled and self.torch_threads:
            _torch().set_num_threads(self._torch_threads)

    # -- the chooser ------------------------------------------------------------------------------
    def _next_mode(self) -> str:
        if self.forced or len(self.modes) == 1:
            self.mode = self.forced or self.modes[0]
            return self.mode
        b, first = self._batches, self.FIRST_TRY
        # turns until FIRST_TRY (batch 0 warms up), then two batches of split (the first drains what turns
        # decoded ahead), then the faster, with two batches of the other mode every RECHECK_EVERY batches
        if b < first:
            self.mode = TURNS
        elif b < first + 2:
            self.mode = SPLIT
        else:
            best = min(self._seconds_per_image, key=self._seconds_per_image.get)
            other = SPLIT if best == TURNS else TURNS
            self.mode = other if (b - first - 2) % self.RECHECK_EVERY >= self.RECHECK_EVERY - 2 else best
        return self.mode

    def _record(self, mode: str, images: int) -> None:
        now = time.perf_counter()
        previous, self._last_end = self._last_end, now
        b = self._batches
        self._batches += 1
        changed = bool(self.history) and self.history[-1][0] != mode
        if previous is None or images == 0:
            return
        per_image = (now - previous) / images  # the whole cycle: waiting for decoded images + forward pass
        self.history.append((mode, per_image))
        if b == 0 or changed:
            return  # warm-up, or a batch that still eats images decoded under the other mode
        old = self._seconds_per_image.get(mode)
        self._seconds_per_image[mode] = per_image if old is None else 0.5 * old + 0.5 * per_image

    @property
    def chosen(self) -> str:
        """The mode that measured faster so far (or the forced one)."""
        if self.forced or not self._seconds_per_image:
            return self.mode
        return min(self._seconds_per_image, key=self._seconds_per_image.get)
