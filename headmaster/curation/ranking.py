"""Ordering images for review: `hm rank` (new images by one bucket's probability) and
`hm suspects` (training images their own bucket does not believe in: likely label errors).

Both score with the same heads and vectors as classify; neither moves a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from headmaster import HeadmasterError
from headmaster.embedding import Context, Skipped, embed_for, vectors_for
from headmaster.heads import (Decision, TrainConfig, TrainedHead, decide_paths, head_from_checkpoint, load_trained,
                              source_images, train_head)
from headmaster.workspace import shown_path


@dataclass
class RankReport:
    head: str
    bucket: str
    ranked: list[Decision] = field(default_factory=list)  # most likely `bucket` first (unless reversed)
    skipped: list[Skipped] = field(default_factory=list)
    total: int = 0  # images scored, before --limit


def default_bucket(trained: TrainedHead) -> str:
    """'positive' if the head has it; a binary head's scored class (classes[1]); else the first class."""
    classes = trained.classes
    if "positive" in classes:
        return "positive"
    return classes[1] if trained.type == "binary" else classes[0]


def rank_folder(ctx: Context, head: str, src: Path, bucket: str | None = None, limit: int | None = None,
                reverse: bool = False, tta: bool = False) -> RankReport:
    """The images directly inside `src`, most likely `bucket` first (least likely with `reverse`)."""
    paths = source_images(src)
    trained, model = load_trained(ctx, head)
    bucket = bucket or default_bucket(trained)
    if bucket not in trained.classes:
        raise HeadmasterError(f"head '{head}' has no bucket '{bucket}' (buckets: {', '.join(trained.classes)})")
    decisions, result = decide_paths(ctx, trained, model, paths, label=f"Ranking {head}", tta=tta)
    # ties keep file-name order in both directions, so the output is stable
    decisions.sort(key=lambda d: (-d.probabilities[bucket] if not reverse else d.probabilities[bucket], d.path.name))
    report = RankReport(head, bucket, decisions[:limit] if limit else decisions, result.skipped, len(decisions))
    return report


def rank_rows(report: RankReport, root: Path | None = None) -> list[dict]:
    rows = []
    for i, d in enumerate(report.ranked, 1):
        rows.append({"rank": i, "image": _shown(d.path, root), f"p_{report.bucket}": d.probabilities[report.bucket],
                     "decision": d.bucket, "score": d.score})
    return rows


@dataclass(frozen=True)
class Suspect:
    path: Path
    hash: str
    bucket: str  # where the user filed it
    probability: float  # out-of-fold probability of that bucket
    preferred: str  # the bucket the out-of-fold head likes best
    preferred_probability: float


@dataclass
class SuspectReport:
    head: str
    folds: int
    suspects: list[Suspect] = field(default_factory=list)  # lowest own-bucket probability first
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    total: int = 0


def fold_assignment(hashes: list[str], labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A fold per image, stratified by label; identical contents share a fold, so a copy never vouches for itself."""
    first_label: dict[str, int] = {}
    for h, y in zip(hashes, labels):
        first_label.setdefault(h, int(y))
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    for c in sorted(set(first_label.values())):
        group = sorted(h for h, y in first_label.items() if y == c)
        rng.shuffle(group)
        for i, h in enumerate(group):
            fold_of[h] = i % folds
    return np.array([fold_of[h] for h in hashes], dtype=int)


def find_suspects(ctx: Context, head: str, folds: int = 5, config: TrainConfig = TrainConfig(),
                  limit: int | None = None) -> SuspectReport:
    """Train `folds` heads, each without one fold, and score every training image with the head that never saw it.

    Returns the images whose own bucket gets the lowest out-of-fold probability,
    with the bucket that head prefers. The head's checkpoint is not touched.
    """
    if folds < 2:
        raise HeadmasterError("--folds must be at least 2")
    model = ctx.active_model()
    labelled = ctx.workspace.head(head)
    warnings = labelled.check()
    items = labelled.labelled_images()
    result = embed_for(ctx, model, [p for p, _ in items], f"Embedding {head}")
    vectors = vectors_for(ctx.store, model, result.hashes)
    usable = [(p, b) for p, b in items if p in vectors]
    classes = labelled.classes
    labels = np.array([classes.index(b) for _, b in usable], dtype=np.int64)
    hashes = [result.hashes[p] for p, _ in usable]
    unique_per_class = [len({h for h, y in zip(hashes, labels) if y == c}) for c in range(len(classes))]
    smallest = min(unique_per_class) if unique_per_class else 0
    if smallest < 2:
        thin = [c for c, n in zip(classes, unique_per_class) if n < 2]
        raise HeadmasterError(f"head '{head}': out-of-fold scoring needs at least 2 different images in every "
                              f"bucket ({', '.join(thin)} has fewer)")
    k = min(folds, smallest)
    if k < folds:
        warnings.append(f"only {k} folds: bucket sizes allow no more")
    matrix = np.stack([vectors[p] for p, _ in usable])
    fold = fold_assignment(hashes, labels, k, config.seed)
    probs = np.zeros((len(usable), len(classes)), dtype=np.float32)
    for f in range(k):
        train_idx, held = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        outcome = train_head(head, classes, matrix[train_idx], labels[train_idx], {}, model.name, config)
        probs[held] = head_from_checkpoint(outcome.checkpoint).predict_proba(matrix[held])
    suspects = []
    for i, (p, bucket) in enumerate(usable):
        best = int(np.argmax(probs[i]))
        suspects.append(Suspect(p, hashes[i], bucket, float(probs[i, labels[i]]), classes[best], float(probs[i, best])))
    suspects.sort(key=lambda s: (s.probability, str(s.path)))
    return SuspectReport(head, k, suspects[:limit] if limit else suspects, result.skipped, warnings, len(suspects))


def suspect_rows(report: SuspectReport, root: Path | None = None) -> list[dict]:
    return [{"rank": i, "image": _shown(s.path, root), "bucket": s.bucket, "p_bucket": s.probability,
             "preferred": s.preferred, "p_preferred": s.preferred_probability}
            for i, s in enumerate(report.suspects, 1)]


def _shown(path: Path, root: Path | None) -> str:
    return path.name if root is None else shown_path(path, root)
