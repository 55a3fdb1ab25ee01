"""The photos of a library a head is least sure of, from cached vectors: the review page's library queue.

A library (a [[library]] tree, or any folder) is listed stat-only (tagrecords.find_images); a photo
counts when the file index knows it at its current size and mtime and the active model has its
vector cached, which is the case once hmd or `hm tag` has tagged it. Nothing is decoded or embedded
here, so ranking a library of thousands of photos takes a database read and one matrix product;
photos without a vector yet are counted as `waiting`. Photos whose content is already an example
of the head (anywhere under heads/<head>/) are left out: there is nothing to learn from them again.

Reads only; writes nothing, and never opens a photo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from headmaster.curation.tagrecords import find_images
from headmaster.embedding import Context, vectors_for
from headmaster.fileops import size_and_mtime


@dataclass(frozen=True)
class LibraryPhoto:
    path: Path
    hash: str
    guess: str  # the bucket on the photo's side of the cut (never 'uncertain')
    decision: str  # the head's own decision: a bucket, or 'uncertain'
    score: float  # the guess's probability
    margin: float  # distance to the cut: smaller is less sure


@dataclass
class LibraryRanking:
    head: str
    root: Path
    photos: int = 0  # listed in the library
    scored: int = 0  # with a cached vector, not already an example
    waiting: int = 0  # no vector yet (new, changed since it was indexed, or unreadable)
    examples: int = 0  # already examples of the head
    ranked: list[LibraryPhoto] = field(default_factory=list)  # nearest the cut first (up to the limit)

    def to_dict(self) -> dict:
        return {"head": self.head, "root": str(self.root), "photos": self.photos, "scored": self.scored,
                "waiting": self.waiting, "examples": self.examples,
                "ranked": [{"path": str(p.path), "hash": p.hash, "guess": p.guess, "decision": p.decision,
                            "score": round(p.score, 4), "margin": round(p.margin, 4)} for p in self.ranked]}


def example_hashes(ctx: Context, head: str) -> set[str]:
    """The content hashes of the head's examples, as the file index knows them (heads/<head>/, any folder)."""
    prefix = str(ctx.workspace.heads_dir / head) + os.sep
    return {r.hash for r in ctx.store.files_under(prefix)}


def rank_library(ctx: Context, root: Path, head: str, recursive: bool = True, limit: int | None = None
                 ) -> LibraryRanking:
    """The library's photos nearest the head's cut first, scored from cached vectors only."""
    from headmaster.heads import cut_margin, load_trained, score_vectors

    trained, model = load_trained(ctx, head)
    root = Path(os.path.normpath(root))
    images = find_images([root], recursive).images
    out = LibraryRanking(head, root, photos=len(images))
    signatures = ctx.store.file_signatures([str(p) for p in images], model.id)
    hashes: dict[Path, str] = {}
    for path in images:
        sig = signatures.get(str(path))
        if sig is None or size_and_mtime(path) != (sig[0], sig[1]) or not sig[4]:
            out.waiting += 1  # not indexed as it is now, or no vector for the active model
            continue
        hashes[path] = sig[3]
    known = example_hashes(ctx, head)
    out.examples = sum(1 for h in hashes.values() if h in known)
    hashes = {p: h for p, h in hashes.items() if h not in known}
    vectors = vectors_for(ctx.store, model, hashes)
    out.waiting += len(hashes) - len(vectors)  # indexed, but the vector went (another model's cache cleared)
    decisions = score_vectors(trained, list(vectors), vectors, hashes)
    out.scored = len(decisions)
    ranked = []
    for d in decisions:
        guess = trained.guess(d.probabilities)
        ranked.append(LibraryPhoto(d.path, d.hash, guess, d.bucket, d.probabilities[guess],
                                   cut_margin(trained, d.probabilities)))
    ranked.sort(key=lambda p: (p.margin, str(p.path)))  # ties: path order, a stable page
    out.ranked = ranked[:limit] if limit else ranked
    return out

