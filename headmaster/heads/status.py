"""What `hm status` shows: each head's buckets, checkpoint and metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from headmaster import HeadmasterError
from headmaster.heads.arrays import HeadRules
from headmaster.heads.tags import describe_tags
from headmaster.workspace import LabelledSet, Workspace


@dataclass
class HeadStatus:
    name: str
    labelled: LabelledSet
    checkpoint: dict[str, Any] | None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def trained(self) -> bool:
        return self.checkpoint is not None

    @property
    def head_type(self) -> str:
        return self.checkpoint["type"] if self.checkpoint else self.labelled.head_type

    @property
    def metrics(self) -> dict[str, Any]:
        return (self.checkpoint or {}).get("metadata", {}).get("metrics", {})

    @property
    def f1(self) -> float | None:
        m = self.metrics
        if "f1" in m:
            return float(m["f1"])
        per_class = m.get("per_class")
        if per_class:  # multi-class: macro F1
            return sum(v["f1"] for v in per_class.values()) / len(per_class)
        return None

    def current_sources(self, heads_dir: Path) -> dict[str, list[str]]:
        return {b.name: sorted(p.relative_to(heads_dir).as_posix() for p in b.images) for b in self.labelled.buckets}

    def changes_since_training(self, heads_dir: Path) -> tuple[int, int]:
        """(added, removed) images compared with the checkpoint's sources."""
        if not self.checkpoint:
            return 0, 0
        now = {p for ps in self.current_sources(heads_dir).values() for p in ps}
        then = {p for ps in self.checkpoint.get("sources", {}).values() for p in ps}
        return len(now - then), len(then - now)


def head_status(ws: Workspace, name: str) -> HeadStatus:
    labelled = ws.head(name)
    path = ws.checkpoint_path(name)
    checkpoint = None
    if path.exists():
        from headmaster.heads.checkpoint import read_checkpoint  # torch: only once there is a checkpoint to read

        try:
            checkpoint = read_checkpoint(path)
        except HeadmasterError as e:
            status = HeadStatus(name, labelled, None)
            status.errors.append(str(e))
            return status
    errors, warnings = labelled.problems()
    return HeadStatus(name, labelled, checkpoint, errors, warnings)


def all_status(ws: Workspace) -> list[HeadStatus]:
    return [head_status(ws, n) for n in ws.head_names()]


def _buckets_short(labelled: LabelledSet, limit: int = 3) -> str:
    parts = [f"{b.name}({len(b.images)})" for b in labelled.buckets]
    return " ".join(parts[:limit]) + ("..." if len(parts) > limit else "")


def format_status_table(rows: list[HeadStatus]) -> str:
    if not rows:
        return "No heads yet. Create one: mkdir -p workspace/heads/NAME/{positive,negative} and add images."
    table = [("HEAD", "TYPE", "BUCKETS", "IMAGES", "TRAINED", "F1")]
    for s in rows:
        f1 = s.f1
        table.append((s.name, s.head_type, _buckets_short(s.labelled), str(s.labelled.image_count),
                      "yes" if s.trained else "no", f"{f1:.2f}" if f1 is not None else "—"))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)


def format_status_detail(s: HeadStatus, heads_dir: Path) -> str:
    lines = [f"Head: {s.name}", f"Type: {s.head_type}"]
    ck = s.checkpoint
    if ck:
        lines.append(f"Kind: {ck.get('kind', 'mlp')}")
    lines.append(f"Model: {ck['model'] if ck else '—'}")
    created = (ck or {}).get("metadata", {}).get("created_at", "")
    lines.append(f"Trained: {created[:10] if ck else 'no'}")
    lines.append("Buckets: " + ", ".join(f"{b.name} ({len(b.images)})" for b in s.labelled.buckets))
    m = s.metrics
    if ck and s.head_type == "binary":
        for key in ("accuracy", "precision", "recall", "f1"):
            if key in m:
                lines.append(f"{'F1' if key == 'f1' else key.capitalize()}: {m[key]:.2f}")
        if ck.get("threshold") is not None:
            lines.append(f"Threshold: {float(ck['threshold']):.2f}")
    elif ck:
        if "accuracy" in m:
            lines.append(f"Accuracy: {m['accuracy']:.2f}")
        per_class = m.get("per_class", {})
        if per_class:
            w = max(5, *(len(c) for c in per_class))
            lines.append(f"  {'CLASS':<{w}}  PRECISION  RECALL    F1")
            for c, v in per_class.items():
                lines.append(f"  {c:<{w}}  {v['precision']:>9.2f}  {v['recall']:>6.2f}  {v['f1']:>4.2f}")
    if ck:
        lines.append(describe_tags(s.name, HeadRules(ck)))
        from headmaster.heads.checkpoint_meta import auto_suggestion, describe_goal, describe_selection

        meta = ck.get("metadata", {})
        if meta.get("error_goal") and ck.get("margin") is not None:
            lines.append(f"Uncertain band: ±{float(ck['margin']):.2f} around the threshold")
        if meta.get("error_goal") and ck.get("min_confidence") is not None and s.head_type != "binary":
            lines.append(f"Minimum confidence: {float(ck['min_confidence']):.2f}")
        if meta.get("selection"):
            lines.append(f"Selection: {describe_selection(meta['selection'])}")
        goal = meta.get("error_goal")
        if goal:
            measured = "" if goal.get("error") is None else f"; measured {goal['error'] * 100:.1f}% wrong, " \
                                                              f"bound {goal['bound'] * 100:.1f}%"
            lines.append(f"Error goal: {describe_goal(goal)}{measured}")
        hint = auto_suggestion(ck.get("kind", "mlp"), meta.get("comparison"))
        if hint:
            lines.append(f"Hint: {hint}")
        added, removed = s.changes_since_training(heads_dir)
        if added or removed:
            lines.append(f"Changed since training: +{added} / -{removed} images (run `hm train --head {s.name}`)")
    for e in s.errors:
        lines.append(f"Error: {e}")
    for w in s.warnings:
        lines.append(f"Warning: {w}")
    return "\n".join(lines)
