"""Embedding and training over the workspace: heads/ folders in, checkpoints in out/ out."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from headmaster import HeadmasterError
from headmaster.embedding import Context, EmbedResult, Skipped, embed_for, vectors_for
from headmaster.store import Model
from headmaster.workspace import LabelledSet, shown_path

if TYPE_CHECKING:
    from headmaster.heads.base import TrainConfig  # base.py imports torch: training loads it, embedding does not


@dataclass(frozen=True)
class LabelConflict:
    """The same content filed under two or more buckets of one head."""

    head: str
    hash: str
    files: tuple[Path, ...]
    buckets: tuple[str, ...]

    def describe(self, root: Path) -> str:
        names = ", ".join(shown_path(f, root) for f in self.files)
        return f"head '{self.head}': identical image in buckets {' and '.join(self.buckets)}: {names}"


@dataclass
class EmbedReport:
    model: Model
    result: EmbedResult
    heads: list[str]
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    conflicts: list[LabelConflict] = field(default_factory=list)
    ignored: int = 0


@dataclass
class TrainReport:
    head: str
    head_type: str
    classes: list[str]
    images: int
    train_count: int
    val_count: int
    checkpoint_path: Path
    metrics: dict
    threshold: float | None
    warnings: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    conflicts: list[LabelConflict] = field(default_factory=list)
    embed: EmbedResult | None = None
    kind: str = "mlp"
    selection: dict | None = None  # --kind auto: the comparison (selection.Comparison.as_metadata)
    error_goal: dict | None = None  # --max-error: the cut and its promise (cuts.ErrorCut.as_metadata)



def find_conflicts(labelled: LabelledSet, hashes: dict[Path, str]) -> list[LabelConflict]:
    """Identical contents filed under more than one bucket (one pass; the rare conflicts are gathered after)."""
    first_bucket: dict[str, str] = {}
    clashing: set[str] = set()
    for path, bucket in labelled.labelled_images():
        h = hashes.get(path)
        if h is not None and first_bucket.setdefault(h, bucket) != bucket:
            clashing.add(h)
    if not clashing:
        return []
    by_hash: dict[str, list[tuple[Path, str]]] = defaultdict(list)
    for path, bucket in labelled.labelled_images():
        h = hashes.get(path)
        if h in clashing:
            by_hash[h].append((path, bucket))
    return [LabelConflict(labelled.name, h, tuple(p for p, _ in items), tuple(sorted({b for _, b in items})))
            for h, items in by_hash.items()]


def head_names(ctx: Context, head: str | None) -> list[str]:
    return ctx.workspace.heads_to_use(head)


def labelled_paths(ctx: Context, head: str | None = None) -> list[Path]:
    """Every labelled image of one head, or of all heads: what `hm embed` embeds."""
    return [p for n in head_names(ctx, head) for p, _ in ctx.workspace.head(n).labelled_images()]


def embed_heads(ctx: Context, head: str | None = None, label: str = "Embedding",
                engine: Callable[..., EmbedResult] | None = None) -> EmbedReport:
    """Embed every image of one head, or of all heads, with the active model.

    `engine` replaces embed_for (same arguments, an EmbedResult back): the Ray engine, say.
    """
    names = head_names(ctx, head)  # workspace mistakes first: they need no model
    sets = [ctx.workspace.head(n) for n in names]
    model = ctx.active_model()
    paths = [p for s in sets for p, _ in s.labelled_images()]
    result = (engine or embed_for)(ctx, model, paths, label)
    report = EmbedReport(model, result, names, ignored=sum(s.ignored for s in sets))
    for s in sets:
        errors, warnings = s.problems()
        report.errors.extend(errors)
        report.warnings.extend(warnings)
        report.conflicts.extend(find_conflicts(s, result.hashes))
    return report


def previous_checkpoint(ctx: Context, head: str) -> dict | None:
    """The head's existing checkpoint, or None when there is none or it cannot be read."""
    path = ctx.workspace.checkpoint_path(head)
    if not path.exists():
        return None
    from headmaster.heads.checkpoint import read_checkpoint

    try:
        return read_checkpoint(path)
    except HeadmasterError:
        return None


def current_kind(previous: dict | None) -> str:
    """The kind of the head's existing checkpoint `previous`, so a retrain (by hand or by the daemon) keeps it;
    else mlp. A head that `--kind auto` chose stays auto: the retrain compares the kinds again.
    """
    if previous is None:
        return "mlp"
    return "auto" if "selection" in previous.get("metadata", {}) else previous.get("kind", "mlp")


def current_error_goal(previous: dict | None, asked: float | None) -> float | None:
    """The error goal a training uses: `asked` (--max-error; 0 drops the goal), else the one the head's
    checkpoint `previous` holds, so a retrain (plain `hm train`, or hmd's) keeps it as it keeps the kind."""
    if asked is not None:
        return asked or None
    goal = (previous or {}).get("metadata", {}).get("error_goal")
    return float(goal["max_error"]) if goal else None


def labelled_rows(ctx: Context, model: Model, labelled: LabelledSet, result: EmbedResult
                  ) -> tuple[list[np.ndarray], list[int], dict[str, list[str]], list[Path]]:
    """(vectors, class indices, sources per bucket, paths) of the head's images that have a vector, in training order.

    The order decides the validation split, so everything that trains on a head's split uses this.
    """
    vectors = vectors_for(ctx.store, model, result.hashes)
    classes = labelled.classes
    rows, labels, sources, paths = [], [], {c: [] for c in classes}, []
    for path, bucket in labelled.labelled_images():
        if path in vectors:
            paths.append(path)
            rows.append(vectors[path])
            labels.append(classes.index(bucket))
            sources[bucket].append(shown_path(path, ctx.workspace.heads_dir))
    return rows, labels, sources, paths


def train_one(ctx: Context, head: str, config: "TrainConfig | None" = None) -> TrainReport:
    """Embed what is missing, train the head and write out/<head>.pt (atomically)."""
    from headmaster.heads.base import TrainConfig
    from headmaster.heads.checkpoint import save_checkpoint
    from headmaster.heads.selection import train_vectors

    config = config or TrainConfig()
    labelled = ctx.workspace.head(head)
    warnings = labelled.check()  # workspace mistakes first: they need no model
    model = ctx.active_model()
    result = embed_for(ctx, model, [p for p, _ in labelled.labelled_images()], f"Embedding {head}")
    classes = labelled.classes
    rows, labels, sources, _ = labelled_rows(ctx, model, labelled, result)
    empty = [c for c in classes if not sources[c]]
    if empty:
        raise HeadmasterError(f"head '{head}': no usable images left in bucket(s) {', '.join(empty)} "
                              f"({len(result.skipped)} files could not be read)")
    matrix = np.stack(rows)
    if matrix.shape[1] != model.embed_dim:
        raise HeadmasterError(f"cached vectors have {matrix.shape[1]} dimensions, model '{model.name}' "
                              f"is registered with {model.embed_dim}")
    previous = previous_checkpoint(ctx, head)  # read once: its kind, its error goal, its weights to start from
    kind = config.kind or current_kind(previous)
    config = replace(config, max_error=current_error_goal(previous, config.max_error))
    if config.warm_start:
        config = warm_config(config, previous, classes, int(matrix.shape[1]))
    outcome = train_vectors(head, classes, matrix, np.array(labels), sources, model.name, kind, config)
    path = ctx.workspace.checkpoint_path(head)
    save_checkpoint(outcome.checkpoint, path)
    if outcome.val_on_train:
        warnings.append(f"head '{head}': too few images for a validation split; metrics are on training data")
    if (why := threshold_trap(outcome.checkpoint)) is not None:
        warnings.append(f"head '{head}': {why}")
    meta = outcome.checkpoint["metadata"]
    return TrainReport(head, outcome.checkpoint["type"], classes, len(rows), outcome.train_count, outcome.val_count,
                       path, meta["metrics"], outcome.checkpoint.get("threshold"),
                       warnings, result.skipped, find_conflicts(labelled, result.hashes), result,
                       outcome.checkpoint["kind"], meta.get("selection"), meta.get("error_goal"))


def threshold_trap(checkpoint: dict) -> str | None:
    """Why a binary checkpoint's threshold leaves one bucket unreachable past its uncertain band, else None."""
    from headmaster.heads.arrays import HeadRules, decidable_thresholds

    rules = HeadRules(checkpoint)
    if rules.type != "binary" or rules.threshold is None:
        return None
    lo, hi = decidable_thresholds(rules.margin)
    if lo <= rules.threshold <= hi:
        return None
    t, m = rules.threshold, rules.margin
    gone, edge = (rules.classes[1], f"above {t + m:.2f}") if t > hi else (rules.classes[0], f"below {t - m:.2f}")
    return (f"threshold {t:.2f} with the uncertain band of ±{m:g} leaves nothing for '{gone}' (a score would have to "
            f"be {edge}): use a threshold from {lo:.2f} to {hi:.2f}")


def warm_config(config: "TrainConfig", previous: dict | None, classes: list[str], input_dim: int) -> "TrainConfig":
    """`config` with the previous MLP's weights to start from, and auto's last choice, when the buckets and
    dimensions are unchanged."""
    from dataclasses import replace

    if previous is None or list(previous["classes"]) != classes or int(previous["input_dim"]) != input_dim:
        return config
    config = replace(config, previous_selection=previous.get("metadata", {}).get("selection"))
    if previous.get("kind", "mlp") != "mlp":
        return config
    return replace(config, init_state=previous["model_state_dict"])
