"""Leaks and duplicates: the same content in heads/H and test/H, in two buckets of H, or nearly the same.

Exact matches come from content hashes (the file index), near matches from the
cosine similarity of cached vectors. Nothing here moves or deletes a file: it
only reports, so the user decides which copy goes.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from headmaster import HeadmasterError
from headmaster.embedding import Context, Skipped, embed_for, hash_paths, vectors_for
from headmaster.store import Store
from headmaster.workspace import LabelledSet, Workspace, shown_path

SIMILARITY_CHUNK = 1024  # rows of the similarity matrix computed at once: memory stays flat


@dataclass(frozen=True)
class Entry:
    """A labelled image and where it sits: ('heads' or 'test', bucket)."""

    path: Path
    part: str
    bucket: str

    @property
    def group(self) -> str:
        return f"{self.part}/{self.bucket}"


@dataclass(frozen=True)
class Leak:
    head: str
    hash: str
    kind: str  # 'test': in heads/H and in test/H; 'buckets': in two buckets of heads/H
    files: tuple[Path, ...]
    buckets: tuple[str, ...]

    def describe(self, root: Path) -> str:
        names = ", ".join(shown_path(f, root) for f in self.files)
        if self.kind == "test":
            return f"leak in head '{self.head}': the same image is in heads/ and test/: {names}"
        return f"head '{self.head}': the same image is in buckets {' and '.join(self.buckets)}: {names}"


def labelled_entries(ws: Workspace, head: str, test_dir: Path | None = None,
                     labelled: LabelledSet | None = None) -> list[Entry]:
    """Every image of heads/<head>/ (`labelled`, if already scanned) and of its test set (test/<head>/ or
    `test_dir`, when it exists)."""
    entries = [Entry(p, "heads", b) for p, b in (labelled or ws.head(head)).labelled_images()]
    test_path = Path(test_dir) if test_dir else ws.test_dir / head
    if test_path.is_dir():
        entries += [Entry(p, "test", b) for p, b in ws.test_set(head, test_path).labelled_images()]
    return entries


def leaks_among(head: str, entries: list[Entry], hashes: dict[Path, str]) -> list[Leak]:
    """Group entries by content: a hash in heads/ and test/ is a leak; one in two training buckets a conflict."""
    by_hash: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        if e.path in hashes:
            by_hash[hashes[e.path]].append(e)
    leaks = []
    for h, group in sorted(by_hash.items(), key=lambda kv: str(kv[1][0].path)):
        parts = {e.part for e in group}
        if parts == {"heads", "test"}:
            leaks.append(Leak(head, h, "test", tuple(e.path for e in group), tuple(sorted({e.bucket for e in group}))))
        train_buckets = sorted({e.bucket for e in group if e.part == "heads"})
        if len(train_buckets) > 1:
            leaks.append(Leak(head, h, "buckets", tuple(e.path for e in group if e.part == "heads"),
                              tuple(train_buckets)))
    return leaks


def indexed_hashes(store: Store, paths: list[Path]) -> dict[Path, str]:
    """Hashes the file index already knows and that still match the file's size, mtime and inode.

    Never reads a file (one stat each): cheap enough for `hm status`.
    """
    keys = {p: str(Path(p).absolute()) for p in paths}
    known = store.file_records(keys.values())
    out: dict[Path, str] = {}
    for p, key in keys.items():
        rec = known.get(key)
        if rec is None:
            continue
        try:
            st = os.stat(p)
        except OSError:
            continue
        if (st.st_size, st.st_mtime_ns, st.st_ino) == (rec.size, rec.mtime_ns, rec.inode):
            out[p] = rec.hash
    return out


def indexed_leaks(ws: Workspace, store: Store, head: str, labelled: LabelledSet | None = None
                  ) -> tuple[list[Leak], int]:
    """Leaks found from the file index alone, and how many images it does not know yet (not checked)."""
    entries = labelled_entries(ws, head, labelled=labelled)
    hashes = indexed_hashes(store, [e.path for e in entries])
    return leaks_among(head, entries, hashes), len(entries) - len(hashes)


def hashed_leaks(ctx: Context, head: str, test_dir: Path | None = None) -> list[Leak]:
    """Leaks over every image of the head and its test set (files new to the index are hashed)."""
    entries = labelled_entries(ctx.workspace, head, test_dir)
    hashes, _, _ = hash_paths(ctx.store, [e.path for e in entries], ctx.options.workers)
    return leaks_among(head, entries, hashes)


@dataclass(frozen=True)
class DuplicatePair:
    a: Entry
    b: Entry
    similarity: float
    identical: bool  # same content hash


@dataclass
class DupesReport:
    head: str
    threshold: float
    pairs: list[DuplicatePair] = field(default_factory=list)  # most similar first
    skipped: list[Skipped] = field(default_factory=list)
    images: int = 0


def find_near_duplicates(ctx: Context, head: str, threshold: float = 0.98, same_bucket: bool = False,
                         test_dir: Path | None = None, limit: int | None = None) -> DupesReport:
    """Pairs of images whose vectors have cosine similarity >= `threshold`.

    Only pairs across buckets or across heads/test by default (those are the
    ones that hurt training or evaluation); `same_bucket` adds the rest.
    """
    if not -1.0 <= threshold <= 1.0:
        raise HeadmasterError(f"--threshold must be between -1 and 1, got {threshold}")
    model = ctx.active_model()
    entries = labelled_entries(ctx.workspace, head, test_dir)
    result = embed_for(ctx, model, [e.path for e in entries], f"Embedding {head}")
    vectors = vectors_for(ctx.store, model, result.hashes)
    usable = [e for e in entries if e.path in vectors]
    report = DupesReport(head, threshold, skipped=result.skipped, images=len(usable))
    if len(usable) < 2:
        return report
    x = np.stack([vectors[e.path] for e in usable]).astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    groups = np.array([e.group for e in usable])
    for start in range(0, len(usable), SIMILARITY_CHUNK):
        sims = x[start : start + SIMILARITY_CHUNK] @ x.T
        rows, cols = np.nonzero(sims >= threshold - 1e-6)
        for r, c in zip(rows, cols):
            i = start + int(r)
            j = int(c)
            if j <= i or (not same_bucket and groups[i] == groups[j]):
                continue
            a, b = usable[i], usable[j]
            report.pairs.append(DuplicatePair(a, b, min(float(sims[r, c]), 1.0),
                                              result.hashes[a.path] == result.hashes[b.path]))
    report.pairs.sort(key=lambda p: (-p.similarity, str(p.a.path), str(p.b.path)))
    if limit:
        report.pairs = report.pairs[:limit]
    return report


def dupes_rows(report: DupesReport, root: Path) -> list[dict]:
    return [{"similarity": p.similarity, "a": shown_path(p.a.path, root), "b": shown_path(p.b.path, root),
             "identical": "yes" if p.identical else "no"} for p in report.pairs]

