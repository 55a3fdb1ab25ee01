"""Tags: what a head's decision says about a photo, in the words caption files and photo tools use.

A binary head is one tag named after the head: `nsfw` when its positive bucket wins, nothing
otherwise. The positive bucket is the one named positive, yes, true or 1 (any case), else the
second of the sorted buckets (the class a binary head scores, `classes[1]`). A multi-class head
gives the winning bucket: `hat`, hierarchically `headmaster|clothing|hat`. `uncertain` adds nothing.

This module imports neither torch nor anything that does.
"""

from __future__ import annotations

from dataclasses import dataclass

from headmaster.heads.arrays import UNCERTAIN, HeadRules

POSITIVE_NAMES = ("positive", "yes", "true", "1")  # in this order of preference
TAG_ROOT = "headmaster"  # root of our keyword hierarchy: headmaster|<head>|<bucket>


@dataclass(frozen=True)
class Tag:
    """One tag a head gives a photo: its path below TAG_ROOT, ("nsfw",) or ("clothing", "hat")."""

    head: str
    path: tuple[str, ...]

    @property
    def keyword(self) -> str:
        """The flat keyword (dc:subject, a caption entry): the leaf."""
        return self.path[-1]

    @property
    def hierarchical(self) -> str:
        """lr:hierarchicalSubject's form: headmaster|clothing|hat."""
        return "|".join((TAG_ROOT, *self.path))

    @property
    def tags_list(self) -> str:
        """digiKam:TagsList's form: headmaster/clothing/hat."""
        return "/".join((TAG_ROOT, *self.path))


def positive_bucket(classes: list[str]) -> tuple[str, str]:
    """(the positive bucket of a binary head, why it is that one)."""
    lowered = {c.lower(): c for c in classes}
    for name in POSITIVE_NAMES:
        if name in lowered:
            return lowered[name], f"the bucket named {lowered[name]}"
    return classes[1], f"the second of the sorted buckets: none is named {', '.join(POSITIVE_NAMES[:-1])} or 1"


def tag_part(name: str) -> str:
    """A head or bucket name as one level of a tag path (| and / separate levels in photo tools)."""
    return name.replace("|", "_").replace("/", "_").strip() or "_"


def tag_for(head: str, rules: HeadRules, bucket: str) -> Tag | None:
    """The tag a decided bucket gives, or None (uncertain, or a binary head's other bucket)."""
    if bucket == UNCERTAIN:
        return None
    if rules.type == "binary":
        return Tag(head, (tag_part(head),)) if bucket == positive_bucket(rules.classes)[0] else None
    return Tag(head, (tag_part(head), tag_part(bucket)))


def decide_with_cut(rules: HeadRules, probabilities: dict[str, float], bucket: str, score: float,
           cut: float | None = None) -> tuple[str, float]:
    """(bucket, score) with a run-time cut, or the head's own decision when `cut` is None.

    Binary: the positive bucket wins when its probability is at least `cut` (seed 003's -t:
    no uncertain band around a cut the user chose); the score is that probability.
    Multi-class: `cut` replaces the head's min_confidence.
    """
    if cut is None:
        return bucket, score
    if rules.type == "binary":
        positive = positive_bucket(rules.classes)[0]
        other = next(c for c in rules.classes if c != positive)
        p = probabilities[positive]
        return (positive if p >= cut else other), p
    top = max(rules.classes, key=lambda c: probabilities[c])
    return (top if probabilities[top] >= cut else UNCERTAIN), probabilities[top]


def cut_margin(rules: HeadRules, probabilities: dict[str, float], cut: float | None = None) -> float:
    """How far a decision is from its cut: |p(positive) - cut| for a binary head (the head's threshold,
    on the positive bucket's side, unless `cut`), the gap between the top two classes otherwise."""
    if rules.type == "binary":
        positive = positive_bucket(rules.classes)[0]
        if cut is None:
            t = rules.threshold if rules.threshold is not None else 0.5
            cut = t if positive == rules.classes[1] else 1 - t
        return abs(probabilities[positive] - cut)
    top = sorted(probabilities.values(), reverse=True)
    return float(top[0] - top[1])


def describe_tags(head: str, rules: HeadRules) -> str:
    """What `hm status --head` says about the tags this head writes."""
    if rules.type == "binary":
        positive, why = positive_bucket(rules.classes)
        return f"Tag: '{tag_part(head)}' when {positive} wins (positive bucket: {why}); nothing otherwise"
    return f"Tags: {TAG_ROOT}|{tag_part(head)}|<bucket> (flat keyword: the bucket)"

