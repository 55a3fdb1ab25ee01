"""What the review page needs from whoever runs it: the daemon (hmd) or `hm serve`.

The web package talks to the heads only through this interface, so serving a page never
imports torch or the model code: `headmaster.web.review.ReviewService` implements it over one
workspace, with the model work sent wherever its owner says (hmd's worker process, or a thread of
`hm serve`: daemon/worker.py's LocalWorker).
Images are named by content hash (SHA-256 hex), never by a path from the request.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from headmaster.config import LibraryConfig

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
    where: str  # 'uncertain' (classified/<head>/uncertain/), 'sorted' (a recent sort), 'example' (heads/)
    # or 'library' (a photo of a [[library]], which stays where it is: a label copies it in)
    bucket: str | None  # the bucket it is in now (None in uncertain/ and in a library)
    guess: str | None  # the head's best guess
    score: float | None  # probability of the guess (suspects: of the image's own bucket)
    margin: float | None = None  # distance from the decision boundary (uncertain and library only)
    library: str | None = None  # the library's name on the page (library only)
    source: str | None = None  # the photo's path inside its library (library only)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Action:
    """One labelling step, as the undo stack keeps it."""

    kind: str  # 'label' (classified/ move that teaches), 'move' (example to another bucket), 'exclude', 'skip',
    # or 'copy' (a library photo copied into heads/<head>/<bucket>/ as an example; the photo stays)
    head: str
    id: str
    name: str
    bucket: str  # where it went
    source: str  # where it was (relative to the workspace)
    destination: str  # where it is now (relative to the workspace)
    learned: str | None = None  # 'added', 'moved', 'unchanged' when a correction became an example
    created: bool = False  # the action made heads/<head>/<bucket>/ (a new bucket); undo removes it again
    note: str | None = None  # one line for the user (what a new bucket still needs)
    previous: str | None = None  # 'copy' that moved an earlier example: the bucket it was in (undo moves it back)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LibraryQueue:
    """A library's photos for one head, nearest the cut first, and what the ranking counted."""

    name: str  # the library's name on the page (its folder's name; -2, -3 ... when two share one)
    path: str
    photos: int  # listed in the library
    scored: int  # with a cached vector, not yet an example of the head
    waiting: int  # no vector yet: hmd (or `hm tag`) embeds a photo when it tags it
    examples: int  # already examples of the head
    items: list[Item] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "photos": self.photos, "scored": self.scored,
                "waiting": self.waiting, "examples": self.examples}


def library_names(libraries: "list[LibraryConfig]") -> dict[str, "LibraryConfig"]:
    """name -> [[library]] table: the name is the folder's own (`Pictures`), `Pictures-2` for the second of two
    folders that share one; in the config's order, so a name stays the same from one start to the next."""
    out: dict[str, LibraryConfig] = {}
    for lib in libraries:
        base = lib.root.name or "library"
        name, n = base, 1
        while name in out:
            n += 1
            name = f"{base}-{n}"
        out[name] = lib
    return out


class ReviewBackend(Protocol):
    """Everything the page reads and changes. Calls may block; the app runs them off its event loop."""

    @property
    def workspace_root(self) -> Path: ...

    def status(self) -> dict[str, Any]:
        """{'daemon': bool, 'heads': {name: {...}}, 'inbox': {...} | None, ...}: never waits for a model."""

    def queue(self, head: str, limit: int) -> list[Item]:
        """classified/<head>/uncertain/ closest to the boundary first, then recent sorts."""

    def library_queue(self, head: str, library: str, limit: int) -> LibraryQueue:
        """The photos of one [[library]] nearest the head's cut, from cached vectors (NotFound for a library the
        head does not tag); a label copies one into heads/<head>/<bucket>/, the photo stays where it is."""

    def libraries(self, head: str | None = None) -> list[dict[str, Any]]:
        """The configured libraries (name, path, heads); with `head`, those that head tags."""

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
