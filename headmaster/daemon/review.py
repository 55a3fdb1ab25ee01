"""The review page's backend inside hmd: model work on the daemon's worker, labels taught at once.

A label taught here is the same `learn()` the corrections loop runs when the watcher sees the
moved file settle; when it does, `learn()` finds the example already in place ('unchanged'),
so a file is learned once. The retrain follows on the usual debounce.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, TypeVar

from headmaster.context import Context
from headmaster.learning import Learned
from headmaster.review import ReviewService

if TYPE_CHECKING:
    from headmaster.daemon.service import Daemon

T = TypeVar("T")


class DaemonReview(ReviewService):
    def __init__(self, daemon: "Daemon"):
        super().__init__(daemon.ws, daemon.ctx.options if daemon.ctx else None)
        self.daemon = daemon

    def run_model(self, fn: Callable[[Context], T]) -> T:
        return self.daemon._on_worker(lambda: fn(self.daemon.ctx))

    def teach(self, head: str, bucket: str, path, hash_: str) -> Learned:
        return self.daemon._teach(head, bucket, path, hash_, "correction", store=self.store)

    def live(self) -> dict[str, Any]:
        return self.daemon.status()
