"""`hm demo`: the main job in miniature, offline, on sample photos that ship inside the package.

It lays out a workspace (one multi-class head of real photos, plus held-back photos of the same classes in
unsorted/), trains the head with the active model (the built-in backbone when none is registered), sorts
the held-back photos into classified/<head>/<bucket>/ or uncertain/ (copies: unsorted/ keeps every original)
and measures how many went to their own class. The samples are resized CC0 photos (samples/LICENSE.md),
chosen by bench/make_demo_samples.py.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from headmaster import HeadmasterError
from headmaster.config import CONFIG_NAME

if TYPE_CHECKING:
    from headmaster.embedding import Context
    from headmaster.heads.sorting import ClassifyReport
    from headmaster.heads.training import TrainReport

SAMPLES = Path(__file__).parent / "samples"
HEAD = "clothing"
MARKER = ".headmaster-demo"  # marks a folder as a demo workspace, so running the demo again may reuse it
UNSORTED = "unsorted"
DEFAULT_DIR = "headmaster-demo"


@dataclass(frozen=True)
class Sample:
    source: Path  # inside the package
    name: str  # its name in the workspace
    cls: str


@dataclass
class Layout:
    root: Path
    train: dict[str, int]  # class -> training photos
    truth: dict[str, str]  # held-back file name in unsorted/ -> its class
    reused: bool  # the folder held an earlier demo

    @property
    def unsorted(self) -> Path:
        return self.root / UNSORTED


@dataclass
class Mistake:
    path: Path
    truth: str
    bucket: str  # where it went: another class, or 'uncertain'
    score: float


@dataclass
class DemoReport:
    layout: Layout
    train: "TrainReport"
    sorted: "ClassifyReport"
    correct: dict[str, int]  # class -> held-back photos sorted into it
    total: dict[str, int]  # class -> held-back photos
    mistakes: list[Mistake] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        """Held-back photos sorted into their own class, over all of them (uncertain counts as not right)."""
        return sum(self.correct.values()) / max(1, sum(self.total.values()))


def classes() -> list[str]:
    return sorted(p.name for p in (SAMPLES / "train").iterdir() if p.is_dir())


def training_samples() -> list[Sample]:
    return [Sample(p, p.name, c) for c in classes() for p in sorted((SAMPLES / "train" / c).glob("*.jpg"))]


def held_back_samples() -> list[Sample]:
    """The held-back photos with neutral names (photo-01.jpg ...) in a fixed shuffled order, so the class is
    not in the name and the classes are mixed as in a real inbox."""
    found = [(p, c) for c in classes() for p in sorted((SAMPLES / "held-back" / c).glob("*.jpg"))]
    random.Random(0).shuffle(found)
    return [Sample(p, f"photo-{i:02d}.jpg", c) for i, (p, c) in enumerate(found, 1)]


def lay_out(root: Path) -> Layout:
    """Copy the samples into `root` (new, empty but for a config.toml, or an earlier demo: files already there are
    kept as they are)."""
    root = Path(root).expanduser().absolute()
    if root.exists() and not root.is_dir():
        raise HeadmasterError(f"{root} exists and is not a folder")
    reused = (root / MARKER).is_file()
    # `hm config init` may have come first: its config.toml is the one thing a new workspace may already hold
    if root.is_dir() and any(p.name != CONFIG_NAME for p in root.iterdir()) and not reused:
        raise HeadmasterError(f"{root} exists and is not empty (and holds no earlier demo): give another folder, "
                              f"e.g. `hm demo ./my-demo`")
    truth = {}
    for s in training_samples():
        _copy_new(s.source, root / "heads" / HEAD / s.cls / s.name)
    for s in held_back_samples():
        _copy_new(s.source, root / UNSORTED / s.name)
        truth[s.name] = s.cls
    train = {c: len(list((SAMPLES / "train" / c).glob("*.jpg"))) for c in classes()}
    (root / MARKER).write_text(json.dumps({"head": HEAD, "held_back": truth}, indent=1, sort_keys=True) + "\n")
    return Layout(root, train, truth, reused)


def _copy_new(source: Path, target: Path) -> None:
    if target.exists():  # an earlier demo's file: never overwritten
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def run_demo(ctx: "Context", layout: Layout) -> DemoReport:
    """Train the demo head and sort the held-back photos; `ctx` is opened on `layout.root`."""
    from headmaster.heads.base import TrainConfig
    from headmaster.heads.sorting import classify_folder
    from headmaster.heads.training import train_one

    trained = train_one(ctx, HEAD, TrainConfig())
    dest = ctx.workspace.classified_dir / HEAD
    # An earlier run's copies are already there: decide again, copy nothing twice.
    again = layout.reused and dest.is_dir() and any(dest.iterdir())
    sorted_ = classify_folder(ctx, HEAD, layout.unsorted, dry_run=again)
    correct = {c: 0 for c in layout.train}
    total = {c: 0 for c in layout.train}
    mistakes = []
    for d in sorted_.decisions:
        truth = layout.truth.get(d.path.name)
        if truth is None:  # a photo the user added to unsorted/
            continue
        total[truth] += 1
        if d.bucket == truth:
            correct[truth] += 1
        else:
            mistakes.append(Mistake(d.path, truth, d.bucket, d.score))
    return DemoReport(layout, trained, sorted_, correct, total, mistakes)
