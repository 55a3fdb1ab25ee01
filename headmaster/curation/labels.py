"""Labels from a CSV file (seed 001's labels.csv): each column after the image column is a head,
each value a bucket, so a row becomes hard links in heads/<column>/<value>/.

    image,presence,closure
    drawing001.jpg,circle_clear,closed
    drawing004.jpg,no_circle,

Everything is checked before anything is made. A CSV is imported whole or not
at all: one bad row (unknown image, wrong number of cells, bad name) stops the
import, unless the caller asks to skip bad rows, and even then a bad row
contributes nothing. Source images are never modified; a run that fails on
disk removes the links and copies it made itself.
"""

from __future__ import annotations

import csv
import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

from headmaster import HeadmasterError
from headmaster.embedding import file_sha256
from headmaster.fileops import copy_into, link_into, unique_path
from headmaster.workspace import is_image_name

MODES = ("link", "copy")


@dataclass(frozen=True)
class LabelAction:
    """Put `source` into heads/<head>/<bucket>/ (from CSV line `line`)."""

    line: int
    source: Path
    head: str
    bucket: str


@dataclass(frozen=True)
class RowProblem:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass
class ImportPlan:
    csv_path: Path
    images_dir: Path
    heads: list[str]
    actions: list[LabelAction] = field(default_factory=list)  # from good rows only
    problems: list[RowProblem] = field(default_factory=list)
    rows: int = 0  # data rows read (blank lines not counted)

    @property
    def bad_lines(self) -> list[int]:
        return sorted({p.line for p in self.problems})


@dataclass(frozen=True)
class Placed:
    action: LabelAction
    target: Path
    how: str  # linked, copied, already there; a dry run says 'would link' or 'would copy' instead


@dataclass
class ImportReport:
    plan: ImportPlan
    placed: list[Placed] = field(default_factory=list)
    dry_run: bool = False

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.placed:
            out[p.how] = out.get(p.how, 0) + 1
        return out


def name_problem(name: str, what: str) -> str | None:
    """Why `name` cannot be a folder name under heads/ (None when it can)."""
    if not name:
        return f"empty {what} name"
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        return f"{what} name '{name}' cannot be a folder name (no slashes, no leading dot)"
    if any(ord(ch) < 32 for ch in name):
        return f"{what} name {name!r} contains control characters"
    return None


def read_label_csv(csv_path: Path, images_dir: Path) -> ImportPlan:
    """Parse and check the whole CSV; never touches heads/. Header problems raise, row problems are collected."""
    csv_path, images_dir = Path(csv_path), Path(images_dir)
    if not csv_path.is_file():
        raise HeadmasterError(f"label file not found: {csv_path}")
    if not images_dir.is_dir():
        raise HeadmasterError(f"images directory not found: {images_dir}")
    root = images_dir.resolve()
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            records = _records(f)
    except UnicodeDecodeError as e:
        raise HeadmasterError(f"{csv_path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise HeadmasterError(f"{csv_path}: cannot parse CSV: {e}") from None
    if not records:
        raise HeadmasterError(f"{csv_path} is empty: the first line must name the image column and the heads")
    header_line, header = records[0]
    heads = [h.strip() for h in header[1:]]
    if not heads:
        raise HeadmasterError(f"{csv_path} line {header_line}: the header needs an image column and at least one "
                              "head column (e.g. image,presence,closure)")
    for h in heads:
        why = name_problem(h, "head")
        if why:
            raise HeadmasterError(f"{csv_path} line {header_line}: {why}")
    twice = sorted({h for h in heads if heads.count(h) > 1})
    if twice:
        raise HeadmasterError(f"{csv_path} line {header_line}: head column(s) named twice: {', '.join(twice)}")
    plan = ImportPlan(csv_path, images_dir, heads)
    first_seen: dict[Path, int] = {}
    for line, cells in records[1:]:
        plan.rows += 1
        problems, actions = _check_row(line, cells, heads, images_dir, root, first_seen)
        if problems:
            plan.problems.extend(problems)
        else:
            plan.actions.extend(actions)
    return plan


def _records(f) -> list[tuple[int, list[str]]]:
    """(line where the record starts, cells) for each non-blank record."""
    reader = csv.reader(f)
    out = []
    start = 1
    for cells in reader:
        if cells and any(c.strip() for c in cells):
            out.append((start, cells))
        start = reader.line_num + 1
    return out


def _check_row(line: int, cells: list[str], heads: list[str], images_dir: Path, root: Path,
               first_seen: dict[Path, int]) -> tuple[list[RowProblem], list[LabelAction]]:
    if len(cells) != len(heads) + 1:
        return [RowProblem(line, f"expected {len(heads) + 1} cells (image + {len(heads)} heads), "
                                 f"found {len(cells)}")], []
    name = cells[0].strip()
    if not name:
        return [RowProblem(line, "no image name in the first cell")], []
    source = images_dir / name
    problems: list[RowProblem] = []
    try:
        inside = source.resolve().is_relative_to(root)
    except OSError:
        inside = False
    if not inside:
        problems.append(RowProblem(line, f"image '{name}' is outside {images_dir}"))
    elif not source.is_file():
        problems.append(RowProblem(line, f"unknown image '{name}' (no such file in {images_dir})"))
    elif not is_image_name(source):
        problems.append(RowProblem(line, f"'{name}' is not an image file name"))
    else:
        key = source.resolve()
        if key in first_seen:
            problems.append(RowProblem(line, f"image '{name}' is listed again (first on line {first_seen[key]})"))
        else:
            first_seen[key] = line
    actions = []
    for head, value in zip(heads, cells[1:]):
        bucket = value.strip()
        if not bucket:
            continue  # an empty cell: this head says nothing about the image
        why = name_problem(bucket, "bucket")
        if why:
            problems.append(RowProblem(line, f"column '{head}': {why}"))
            continue
        actions.append(LabelAction(line, source, head, bucket))
    return problems, actions


def _already_there(source: Path, folder: Path) -> Path | None:
    """A file in `folder` named like the source (`name`, `stem_1.ext`, ...) that holds the same content.

    Re-running an import then adds nothing, even where a clash gave the file a `_N` name.
    """
    stem, suffix = os.path.splitext(source.name)
    candidates = [folder / source.name]
    n = 1
    while (folder / f"{stem}_{n}{suffix}").exists():
        candidates.append(folder / f"{stem}_{n}{suffix}")
        n += 1
    digest = None
    for existing in candidates:
        try:
            if not existing.is_file():
                continue
            if os.path.samefile(existing, source):
                return existing
            if existing.stat().st_size == source.stat().st_size:
                digest = digest or file_sha256(source)
                if file_sha256(existing) == digest:
                    return existing
        except OSError:
            continue
    return None


def import_labels(plan: ImportPlan, heads_dir: Path, mode: str = "link", dry_run: bool = False,
                  skip_bad_rows: bool = False) -> ImportReport:
    """Carry out a checked plan: link (or copy) each image into heads/<head>/<bucket>/.

    Refuses (HeadmasterError, nothing made) when the plan has problems, unless
    `skip_bad_rows`. A name already taken by other content gets `name_1.ext`;
    the same content under the same name is left as it is. With `dry_run` the
    report lists what would be made and nothing is.
    """
    if mode not in MODES:
        raise HeadmasterError(f"unknown import mode '{mode}' (use link or copy)")
    if plan.problems and not skip_bad_rows:
        raise HeadmasterError(f"{len(plan.bad_lines)} bad row(s) in {plan.csv_path} (lines "
                              f"{', '.join(map(str, plan.bad_lines))}); nothing imported: fix them, or pass "
                              "--skip-bad-rows to import the other rows")
    report = ImportReport(plan, dry_run=dry_run)
    planned: set[Path] = set()
    made: list[Path] = []
    new_dirs: list[Path] = []
    try:
        for action in plan.actions:
            folder = Path(heads_dir) / action.head / action.bucket
            same = _already_there(action.source, folder)
            if same is not None:
                report.placed.append(Placed(action, same, "already there"))
                continue
            if dry_run:
                target = unique_path(folder, action.source.name, planned)
                planned.add(target)
                report.placed.append(Placed(action, target, f"would {mode}"))
                continue
            new_dirs.extend(_missing_dirs(folder))
            if mode == "link":
                target, how = link_into(action.source, folder)
            else:
                target, how = copy_into(action.source, folder), "copied"
            made.append(target)
            report.placed.append(Placed(action, target, how))
    except OSError as e:
        for p in reversed(made):  # our own new links and copies, never a file that was there before
            p.unlink(missing_ok=True)
        for d in reversed(new_dirs):
            try:
                d.rmdir()
            except OSError:
                pass
        reason = e.strerror or errno.errorcode.get(e.errno or 0, str(e))
        raise HeadmasterError(f"import stopped: {reason} ({e.filename}); the {len(made)} file(s) it had made "
                              "were removed again, nothing is imported") from None
    return report


def _missing_dirs(folder: Path) -> list[Path]:
    """The folders (outermost first) that making `folder` would create."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return list(reversed(missing))
