"""Safe file placement: never overwrite, never delete a source before its copy is durable.

One place decides destination names (`unique_path`); every copy and move in
headmaster goes through `copy_into` or `move_into`.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

TEMP_PREFIX = ".hm-tmp-"  # hidden, so scans ignore it; cleaned by `remove_stale_temps`


def size_and_mtime(path: Path | str) -> tuple[int, int] | None:
    """(size, mtime_ns) of `path`, or None when it cannot be stat'ed: what says a file is as it was."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def unique_path(folder: Path, name: str, taken: set[Path] | None = None) -> Path:
    """`folder/name` if free, else `stem_1.ext`, `stem_2.ext`, ... (the first free one).

    Paths in `taken` count as used too: a dry run plans the names a real run would get.
    """
    candidate = folder / name
    stem, suffix = os.path.splitext(name)
    n = 0
    while os.path.lexists(candidate) or (taken is not None and candidate in taken):
        n += 1
        candidate = folder / f"{stem}_{n}{suffix}"
    return candidate


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory
    finally:
        os.close(fd)


def _link_unique(existing: Path, folder: Path, name: str) -> Path:
    """Hard-link `existing` under a free name in `folder`; link() never replaces, so races cannot clobber."""
    while True:
        target = unique_path(folder, name)
        try:
            os.link(existing, target)
            return target
        except FileExistsError:
            continue


NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK)


def claim_name(tmp: Path, target: Path) -> None:
    """Give `tmp` the name `target` only if that name is free; FileExistsError otherwise. Never replaces."""
    try:
        os.link(tmp, target)  # link() never replaces, so a file that appeared meanwhile is safe
    except OSError as e:
        if e.errno not in NO_HARD_LINKS:
            raise
        # no hard links here: reserve the name exclusively, then rename over our own reservation
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        os.replace(tmp, target)
        return
    tmp.unlink()


def _claim_unique(tmp: Path, folder: Path, name: str) -> Path:
    """Give `tmp` a free final name without ever replacing another file."""
    while True:
        target = unique_path(folder, name)
        try:
            claim_name(tmp, target)
            return target
        except FileExistsError:
            continue


def write_atomic(path: Path, write: Callable[[BinaryIO], object], replace: bool = True, sync_dir: bool = True) -> None:
    """Write `path` through a temp file in the same folder, fsynced, then renamed into place.

    `replace=False` keeps an existing file (FileExistsError). The temp file never outlives a failure.
    `sync_dir=False` leaves the folder's fsync (which makes the rename durable) to the caller, who
    writes many files into few folders and syncs each folder once.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            claim_name(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def copy_into(src: Path, folder: Path, name: str | None = None) -> Path:
    """Copy `src` into `folder` (content fsynced before it gets its final name); returns the new path."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
    try:
        with open(src, "rb") as fin, open(tmp, "xb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        shutil.copystat(src, tmp)
        target = _claim_unique(tmp, folder, name or Path(src).name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(folder)
    return target


def link_into(src: Path, folder: Path, name: str | None = None) -> tuple[Path, str]:
    """Hard-link `src` into `folder` under a free name, or copy it where links cannot be made
    (another filesystem, no link support). Returns (new path, 'linked' or 'copied')."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        target = _link_unique(Path(src), folder, name or Path(src).name)
    except OSError as e:
        if e.errno not in NO_HARD_LINKS:
            raise
        return copy_into(Path(src), folder, name), "copied"
    fsync_dir(folder)
    return target, "linked"


def move_into(src: Path, folder: Path, name: str | None = None) -> Path:
    """Move `src` into `folder` under a free name; returns the new path.

    Same filesystem: hard link, fsync the folder, then unlink the source. Across
    filesystems: copy (fsynced), then unlink the source. At any instant the
    file exists at least once; the source is only removed once the copy is durable.
    """
    target, _ = link_into(src, folder, name)
    os.unlink(src)
    fsync_dir(Path(src).parent)
    return target


def remove_stale_temps(root: Path, older_than_s: float = 0.0) -> int:
    """Delete our own leftover temp files (never a user's file) below `root`; returns how many.

    With `older_than_s`, a temp file changed more recently is left alone (another process, e.g. `hm tag`
    beside hmd, may be writing it now).
    """
    count = 0
    if not root.is_dir():
        return 0
    now = time.time()
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.startswith(TEMP_PREFIX):
                path = Path(dirpath, f)
                try:
                    if older_than_s and now - path.stat().st_mtime < older_than_s:
                        continue
                    path.unlink()
                except FileNotFoundError:
                    continue
                count += 1
    return count
