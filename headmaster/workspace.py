"""The workspace: folders that define heads, buckets and test sets.

The directory structure is the whole configuration: `heads/<head>/<bucket>/`
holds labelled images, `test/<head>/<bucket>/` an optional test set. A folder whose
name starts with `.` or `_` (like `heads/<head>/_excluded/`) is not a bucket.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from headmaster import HeadmasterError

HEIF_EXTENSIONS = frozenset({".heic", ".heif", ".avif"})  # iPhones' HEIC (pillow-heif), AVIF (Pillow's own plugin)
# camera RAW: read through the embedded JPEG preview (rawpy), a reduced demosaic when there is none
RAW_EXTENSIONS = frozenset({".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2"})
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}) | HEIF_EXTENSIONS \
    | RAW_EXTENSIONS
MIN_BUCKET_IMAGES = 20  # below this a bucket gets a warning, not an error
DEFAULT_WORKSPACE = "workspace"
NOT_BUCKET_PREFIXES = (".", "_")  # folders in a head that are not buckets (heads/<head>/_excluded/, ...)
CACHE_ENV = "HEADMASTER_CACHE_DIR"


def cache_root() -> Path:
    """$HEADMASTER_CACHE_DIR, else $XDG_CACHE_HOME/headmaster, else ~/.cache/headmaster: per-user caches outside
    any workspace (the built-in backbone, exported ONNX backbones, head arrays), safe to delete."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen:
        return Path(chosen).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "headmaster").absolute()


def is_image_name(path: Path | str) -> bool:
    """True for a visible file whose extension is an image extension (any case)."""
    return _is_image_file_name(path.name if isinstance(path, Path) else os.path.basename(path))


def _is_image_file_name(name: str) -> bool:
    dot = name.rfind(".")  # not os.path.splitext: this runs once per file on every re-run
    return dot > 0 and name[0] != "." and name[dot:].lower() in IMAGE_EXTENSIONS


# CPython's own child-path constructor (what Path.iterdir uses) skips re-parsing the parent: about 5x faster
# than `folder / name`, which matters once per file on every re-run. `/` wherever it is missing.
_child_path = getattr(Path, "_make_child_relpath", None) or Path.__truediv__


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def from_env(cls, root: str | os.PathLike | None = None) -> "Workspace":
        """`root`, else $HEADMASTER_WORKSPACE, else ./workspace."""
        chosen = root or os.environ.get("HEADMASTER_WORKSPACE") or DEFAULT_WORKSPACE
        return cls(Path(chosen).expanduser().absolute())

    @property
    def heads_dir(self) -> Path:
        return self.root / "heads"

    @property
    def test_dir(self) -> Path:
        return self.root / "test"

    @property
    def out_dir(self) -> Path:
        return self.root / "out"

    @property
    def classified_dir(self) -> Path:
        return self.root / "classified"

    @property
    def db_path(self) -> Path:
        return self.root / "headmaster.db"

    def checkpoint_path(self, head: str) -> Path:
        return self.out_dir / f"{head}.pt"

    def trained_checkpoint(self, head: str) -> Path:
        """out/<head>.pt, or the error a user sees for a head not trained yet."""
        path = self.checkpoint_path(head)
        if not path.exists():
            raise HeadmasterError(f"head '{head}' is not trained yet (no {path}): run `hm train --head {head}`")
        return path

    def heads_to_use(self, head: str | None) -> list[str]:
        """[head] if it exists, else every head; an unknown head or no heads at all is an error. Pure file
        system work, so commands answer a mistake before any model or torch loads."""
        if head is not None:
            self.head(head)  # raises for an unknown head
            return [head]
        names = self.head_names()
        if not names:
            raise HeadmasterError(f"no heads in {self.heads_dir}: make one with mkdir -p "
                                  f"{self.heads_dir}/NAME/{{positive,negative}} and add images "
                                  f"(or try `hm demo` first)")
        return names

    def head_names(self) -> list[str]:
        """Every visible folder under heads/, sorted."""
        if not self.heads_dir.is_dir():
            return []
        return sorted(p.name for p in self.heads_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def head(self, name: str) -> "LabelledSet":
        """Scan heads/<name>/; a missing head is a HeadmasterError naming the ones that exist."""
        path = self.heads_dir / name
        if not name or "/" in name or name.startswith(".") or not path.is_dir():
            known = ", ".join(self.head_names()) or "none"
            raise HeadmasterError(f"unknown head '{name}' (no folder {path}); heads: {known}")
        return scan_labelled_set(name, path)

    def test_set(self, name: str, test_dir: Path | None = None) -> "LabelledSet":
        """Scan the test set of a head: `test_dir` or test/<name>/."""
        path = Path(test_dir) if test_dir else self.test_dir / name
        if not path.is_dir():
            raise HeadmasterError(f"test directory not found: {path}")
        return scan_labelled_set(name, path)


@dataclass
class Bucket:
    name: str
    path: Path
    images: list[Path] = field(default_factory=list)


@dataclass
class LabelledSet:
    """A folder of bucket folders: a head's training examples, or its test set."""

    name: str
    path: Path
    buckets: list[Bucket]
    ignored: int = 0  # hidden and non-image files, and stray subfolders

    @property
    def classes(self) -> list[str]:
        return [b.name for b in self.buckets]  # already sorted

    @property
    def head_type(self) -> str:
        return "binary" if len(self.buckets) == 2 else "multiclass"

    @property
    def image_count(self) -> int:
        return sum(len(b.images) for b in self.buckets)

    def labelled_images(self) -> list[tuple[Path, str]]:
        return [(img, b.name) for b in self.buckets for img in b.images]

    def problems(self) -> tuple[list[str], list[str]]:
        """(errors, warnings) as the spec defines them."""
        errors: list[str] = []
        warnings: list[str] = []
        if len(self.buckets) < 2:
            errors.append(f"head '{self.name}' needs at least 2 buckets, found {len(self.buckets)} in {self.path}")
        for b in self.buckets:
            if not b.images:
                errors.append(f"bucket '{b.name}' of head '{self.name}' has no images")
            elif len(b.images) < MIN_BUCKET_IMAGES:
                warnings.append(
                    f"bucket '{b.name}' of head '{self.name}' has only {len(b.images)} images "
                    f"(at least {MIN_BUCKET_IMAGES} recommended)"
                )
        return errors, warnings

    def check(self) -> list[str]:
        """Raise on the first error; return the warnings."""
        errors, warnings = self.problems()
        if errors:
            raise HeadmasterError("; ".join(errors))
        return warnings


def shown_path(path: Path | str, root: Path | None) -> str:
    """`path` relative to `root` when it lies below it (POSIX separators), else the path as given."""
    if root is not None:
        try:
            return Path(path).relative_to(root).as_posix()
        except ValueError:
            pass
    return str(path)


def list_images(folder: Path) -> tuple[list[Path], int]:
    """Images directly inside `folder` (sorted) and the count of other entries ignored."""
    names: list[str] = []
    ignored = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_file() and _is_image_file_name(entry.name):
                names.append(entry.name)
            else:
                ignored += 1
    names.sort()  # sorting names, not Paths: Path comparisons cost ~1 us each, the largest part of a re-run
    folder = Path(folder)
    return [_child_path(folder, n) for n in names], ignored


def scan_labelled_set(name: str, path: Path) -> LabelledSet:
    buckets: list[Bucket] = []
    ignored = 0
    for entry in sorted(path.iterdir()):
        if entry.is_dir() and entry.name.startswith(NOT_BUCKET_PREFIXES):
            continue  # hidden, or ours like _excluded/ (images taken out of training): never a bucket
        if entry.is_dir():
            images, skipped = list_images(entry)
            buckets.append(Bucket(entry.name, entry, images))
            ignored += skipped
        else:
            ignored += 1
    return LabelledSet(name, path, buckets, ignored)
