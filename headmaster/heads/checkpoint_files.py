"""Checkpoint files in out/: export and clean."""

from __future__ import annotations

import shutil
from pathlib import Path

from headmaster import HeadmasterError
from headmaster.workspace import Workspace


def checkpoint_files(ws: Workspace, head: str | None = None) -> list[Path]:
    if head is not None:
        path = ws.checkpoint_path(head)
        if not path.exists():
            raise HeadmasterError(f"no checkpoint for head '{head}' ({path})")
        return [path]
    return sorted(ws.out_dir.glob("*.pt")) if ws.out_dir.is_dir() else []


def export_checkpoints(ws: Workspace, dest: Path) -> list[Path]:
    """Copy every checkpoint into `dest` (created if needed); existing files there are replaced."""
    files = checkpoint_files(ws)
    if not files:
        raise HeadmasterError(f"no checkpoints in {ws.out_dir}: train a head first")
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise HeadmasterError(f"--dest {dest} exists and is not a directory")
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in files:
        target = dest / f.name
        shutil.copy2(f, target)
        copied.append(target)
    return copied


def clean_checkpoints(ws: Workspace, head: str | None = None) -> list[Path]:
    """Remove one head's checkpoint, or all of them. Images are never touched."""
    files = checkpoint_files(ws, head)
    for f in files:
        f.unlink()
    return files
