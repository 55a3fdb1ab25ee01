"""The review page's backend inside hmd: model work on the daemon's worker process, labels taught at once.

The supervisor serves the page without torch: ranking the uncertain images, finding suspects
and computing the evaluation figures are named calls to the worker (the same operations
`hmctl uncertain` and `hmctl suspects` use); file moves stay here, with the crash-safe moves of
headmaster/fileops.py. A label taught here is the same `learn()` the corrections loop runs when
the watcher sees the moved file settle; when it does, `learn()` finds the example already in
place ('unchanged'), so a file is learned once. The retrain follows on the usual debounce.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from headmaster.learning import Learned
from headmaster.review import ReviewService

if TYPE_CHECKING:
    from headmaster.daemon.service import Daemon


class DaemonReview(ReviewService):
    def __init__(self, daemon: "Daemon"):
        super().__init__(daemon.ws)
        self.daemon = daemon

    def model_call(self, op: str, **args: Any) -> Any:
        return self.daemon.worker_call(op, **args)

    def teach(self, head: str, bucket: str, path, hash_: str) -> Learned:
        return self.daemon._teach(head, bucket, path, hash_, "correction", store=self.store)

    def live(self) -> dict[str, Any]:
        return self.daemon.status()
