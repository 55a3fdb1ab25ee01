"""Learning from corrections (`[learning]`), on the job thread and from the review page.

A file the user moves into classified/<head>/<bucket>/ becomes an example of that bucket
(`learn`); a confident sort left alone for `confirm_after_days` becomes one too (`confirm`);
a label given on the review page is taught at once, from the page's thread, over its own
connection (`teach`). Each new example marks its head dirty, so the head retrains.
"""

from __future__ import annotations

from pathlib import Path

from loguru import logger

from headmaster.curation import Learned, confirmable, is_correction, learn
from headmaster.daemon.events import Events
from headmaster.daemon.hub import Hub
from headmaster.embedding import hash_paths
from headmaster.store import Store


class Corrections:
    def __init__(self, hub: Hub, events: Events):
        self.hub = hub
        self.events = events

    def learn(self, paths: list[Path]) -> None:
        """Files the user put into classified/<head>/<bucket>/ become examples of that bucket."""
        hub = self.hub
        hashes, _, _ = hash_paths(hub.store, paths)
        for path, hash_ in hashes.items():
            head, bucket, _ = path.relative_to(hub.classified_dir).parts
            if head not in hub.ws.head_names():
                continue
            if not is_correction(hub.store, head, bucket, path, hash_):
                continue
            self.teach(head, bucket, path, hash_, "correction")

    def teach(self, head: str, bucket: str, path: Path, hash_: str, kind: str, store: Store | None = None
              ) -> Learned:
        """Learn one example; `store`: the caller's connection (the review page teaches from its own thread)."""
        hub = self.hub
        learned = learn(store or hub.store, hub.ws, head, bucket, path, hash_, kind)
        if learned.action == "unchanged":
            return learned
        was = f" (was {learned.previous})" if learned.previous and learned.previous != bucket else ""
        logger.info("learned from {}: {} is {}{} -> {} example {}", kind, path.name, bucket, was, learned.action,
                    learned.example.relative_to(hub.ws.heads_dir))
        with hub.state.lock:
            hub.state.head(head).corrections += 1
        self.events.mark_dirty(head)
        return learned

    def confirm(self) -> None:
        """Confident sorts the user left alone for confirm_after_days become examples too."""
        hub = self.hub
        for head, bucket, path, hash_ in confirmable(hub.store, hub.ws, hub.config.learning.confirm_after_days):
            if head in hub.ws.head_names():
                self.teach(head, bucket, path, hash_, "confirmed")
