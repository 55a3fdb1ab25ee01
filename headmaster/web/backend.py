"""What the review page needs from whoever runs it: the daemon (hmd) or `hm serve`.

The web package talks to the heads only through this interface, so serving a page never
imports torch or the model code: `headmaster.web.review.ReviewService` implements it over one
workspace, with the model work sent wherever its owner says (hmd's worker process, or a thread of
`hm serve`: daemon/worker.py's LocalWorker).
Images are named by content hash (SHA-256 hex), never by a path from the request.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

HASH_ID = re.compile(r"^[0-9a-f]{64}$")
EXCLUDED = "_excluded"  # heads/<head>/_excluded/: taken out of training, never deleted


class NotFound(LookupError):
    """An unknown head, image id or bucket: the page answers 404."""


@dataclass(frozen=True)
class Item:
    """One image on the page, with what the head thinks of it."""

    id: str  # content hash
    head: str
    name: str  # file name
    where: str  # 'uncertain' (classified/<head>/uncertain/), 'sorted' (a recent sort) or 'example' (heads/)
    bucket: str | None  # the bucket it is in now (None in uncertain/)
    guess: str | None  # the head's best guess
    score: float | None  # probability of the guess (suspects: of the image's own bucket)
    margin: float | None = None  # distance from the decision boundary (uncertain only)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Action:
    """One labelling step, as the undo stack keeps it."""

    kind: str  # 'label' (classified/ move that teaches), 'move' (example to another bucket), 'exclude' or 'skip'
    head: str
    id: str
    name: str
    bucket: str  # where it went
    source: str  # where it was (relative to the workspace)
    destination: str  # where it is now (relative to the workspace)
    learned: str | None = None  # 'added', 'moved', 'unchanged' when a correction became an example
    created: bool = False  # the action made heads/<head>/<bucket>/ (a new bucket); undo removes it again
    note: str | None = None  # one line for the user (what a new bucket still needs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ReviewBackend(Protocol):
    """Everything the page reads and changes. Calls may block; the app runs them off its event loop."""

    @property
    def workspace_root(self) -> Path: ...

    def status(self) -> dict[str, Any]:
        """{'daemon': bool, 'heads': {name: {...}}, 'inbox': {...} | None, ...}: never waits for a model."""

    def queue(self, head: str, limit: int) -> list[Item]:
        """classified/<head>/uncertain/ closest to the boundary first, then recent sorts."""

    def suspects(self, head: str, limit: int) -> list[Item]:
        """Training images the out-of-fold scores put in doubt (another bucket preferred, or their own bucket's
        probability under the head's cut), most suspect first; none when nothing is in doubt."""

    def suspects_total(self, head: str) -> int:
        """How many images `suspects` has in doubt right now, before its limit."""

    def details(self, head: str) -> dict[str, Any]:
        """Checkpoint metrics, and the evaluation figures when they have been computed."""

    def evaluate(self, head: str) -> dict[str, Any]:
        """Compute the evaluation figures now (test-set confusion matrix, repeated splits)."""

    def label(self, head: str, id: str, bucket: str) -> Action:
        """Put the image into `bucket`: a queue image teaches the head, an example moves bucket."""

    def new_bucket(self, head: str, id: str, name: str) -> Action:
        """Make heads/<head>/<name>/ with this image as its first example (HeadmasterError for a bad name)."""

    def skip(self, head: str, id: str) -> Action:
        """Leave the image where it is and stop showing it on this page (until undone or the server restarts)."""

    def exclude(self, head: str, id: str) -> Action:
        """Take an example out of training, into heads/<head>/_excluded/."""

    def undo(self) -> Action | None:
        """Revert the last action (None when there is nothing to undo); returns the reverted action."""

    def image_path(self, id: str) -> Path:
        """Where the image with this id is now (NotFound for ids this backend never showed)."""

    def restore_item(self, action: Action) -> Item | None:
        """The item as it is again after `action` was undone (to put it back on the page)."""
