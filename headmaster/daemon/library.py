"""Keeping photo libraries tagged ([[library]] in the config), on the job thread.

A library is a folder of photos that stays where it is: hmd lists it (stat only, against the
`tags` record of curation/tagrecords.py), tags what is new, changed or decided by an older
checkpoint through the worker's `tag` (calls.py's crash-safe per-file call, `max_batch_images`
at a time), and after a head it uses retrains rewrites only the photos whose decision changed
(the vectors come from the cache). The watcher reports changes under a library root
(watcher.py); settled photos come here from the Daemon's `_settled`.

Library files are never moved, renamed or opened for writing, and nothing is untagged: a library
whose folder vanishes (an unmounted disk) pauses with one log line and resumes when it is back
(a timer stats the roots every LIBRARY_CHECK_S seconds); its photos keep their sidecars and records.
A photo deleted from a library that is there loses its records in the database at the next listing
(its sidecars stay). A workspace inside a library is not part of it.

    [[library]]
    path = "~/Pictures"
    heads = ["colour"]   # or "all"
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from loguru import logger

from headmaster import HeadmasterError
from headmaster.config import LibraryConfig
from headmaster.curation import SKIP_FOLDERS, find_images, forget_gone, forget_tag_records, tagged_images
from headmaster.daemon.calls import CRASHED, Calls
from headmaster.daemon.hub import Hub, Task
from headmaster.fileops import remove_stale_temps, size_and_mtime
from headmaster.workspace import is_image_name

STALE_TEMP_S = 5.0  # a sidecar's temp file older than this is a leftover of a crash (a write takes milliseconds)
LIBRARY_CHECK_S = 5.0  # how often a library's root is stat'ed, to pause when it vanishes and resume when it is back


@dataclass
class LibraryState:
    config: LibraryConfig
    root: Path
    photos: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (size, mtime_ns) when last seen
    tagged: set[str] = field(default_factory=set)  # photos whose sidecars are current
    failed: dict[str, tuple[tuple[int, int] | None, str]] = field(default_factory=dict)  # path -> (stat, reason)
    paused: bool = False
    watch: Any = None  # watchdog's ObservedWatch while the root is watched
    exclude: list[Path] = field(default_factory=list)  # hmd's workspace, when it lies inside the library


class Libraries:
    def __init__(self, hub: Hub, calls: Calls):
        self.hub = hub
        self.calls = calls
        self.lock = threading.Lock()
        ws = Path(os.path.normpath(hub.ws.root.absolute()))
        self.libraries = [_library_state(lib, ws) for lib in hub.config.library]
        self._swept: set[Path] = set()  # libraries cleared of our leftover temp files since start
        self._checked: dict[str, str] = {}  # head -> the checkpoint (its version) its libraries were queued for
        self.watch: Callable[[Path], Any] | None = None  # the Daemon's: schedule a root on the observer
        self.unwatch: Callable[[Any], None] | None = None

    # -- which library a path belongs to -------------------------------------------------
    def roots(self) -> list[Path]:
        return [lib.root for lib in self.libraries]

    def find(self, path: Path) -> LibraryState | None:
        for lib in self.libraries:
            if _belongs(lib, path):
                return lib
        return None

    # -- start-up, rescan and the timer -------------------------------------------------------
    def start(self) -> None:
        """Watch every root that is there (the others are found missing by their first scan), arm the timer."""
        for lib in self.libraries:
            if lib.root.is_dir():
                lib.watch = self._watch(lib.root)
        if self.libraries:
            self.hub.scheduler.add_job(self.check_roots, "interval", seconds=LIBRARY_CHECK_S, id="libraries")

    def queue_all(self) -> None:
        for lib in self.libraries:
            self.hub.tasks.put(Task("library", paths=(lib.root,)))

    def check_roots(self) -> None:
        """Scheduler thread, stat only: a root that vanished or came back gets a scan queued."""
        for lib in self.libraries:
            if lib.root.is_dir() == lib.paused:
                self.hub.tasks.put(Task("library", paths=(lib.root,)))

    def retrained(self, head: str) -> None:
        """A head has a new checkpoint (hmd trained it, or `hm train` beside us): every library that uses it is
        checked again, once per checkpoint (only changed decisions are written)."""
        summary = self.hub.checkpoints.summary(self.hub.ws.checkpoint_path(head))
        created = str((summary or {}).get("version") or "")
        if not created or self._checked.get(head) == created:
            return
        self._checked[head] = created
        for lib in self.libraries:
            if lib.config.heads is None or head in lib.config.heads:
                self.hub.tasks.put(Task("library", paths=(lib.root,)))

    # -- the job thread --------------------------------------------------------------------
    def scan(self, root: Path) -> None:
        """List one library, then tag what is not current."""
        lib = next((lib for lib in self.libraries if lib.root == root), None)
        if lib is None or not self._present(lib):
            return
        self.hub.set_activity(f"listing library {lib.root}")
        try:
            if lib.root not in self._swept:  # once per start: a sidecar write a crash cut short leaves a temp file
                self._swept.add(lib.root)
                if removed := remove_stale_temps(lib.root, STALE_TEMP_S):
                    logger.info("library {}: removed {} temporary file(s) left by an interrupted write", lib.root,
                                removed)
            images = find_images([lib.root], lib.config.recursive, exclude=lib.exclude).images
        except (OSError, HeadmasterError) as e:  # vanished while we listed it: the timer finds it missing
            logger.warning("library {}: cannot list it: {}", lib.root, getattr(e, "strerror", None) or e)
            return
        stats = {str(p): st for p in images if (st := size_and_mtime(p)) is not None}
        with self.lock:
            lib.photos = stats
        if lib.root.is_dir() and (gone := forget_gone(self.hub.store, lib.root, set(stats))):
            logger.info("library {}: forgot the tag records of {} photo(s) no longer there (their sidecars stay)",
                        lib.root, gone)
        self._tag(lib, stats)

    def settled(self, paths: list[Path]) -> None:
        """Photos under a library that stopped changing: tag those that are not current."""
        by_lib: dict[int, dict[str, tuple[int, int]]] = {}
        for p in paths:
            lib = self.find(p)
            if lib is None or lib.paused or not _wanted(lib, p) or (st := size_and_mtime(p)) is None:
                continue
            by_lib.setdefault(id(lib), {})[str(p)] = st
            with self.lock:
                lib.photos[str(p)] = st
        for lib in self.libraries:
            if id(lib) in by_lib:
                self._tag(lib, by_lib[id(lib)])

    def forget(self, path: Path) -> None:
        """A photo or folder left a library (removed or moved away): no longer counted, its records in the database
        dropped; its sidecars stay. Not while the library's root itself is gone (that pauses it, and forgets nothing)."""
        lib = self.find(path)
        if lib is None:
            return
        key, prefix = str(path), str(path) + os.sep
        with self.lock:
            for p in [p for p in lib.photos if p == key or p.startswith(prefix)]:
                lib.photos.pop(p, None)
                lib.tagged.discard(p)
                lib.failed.pop(p, None)
        if path != lib.root and lib.root.is_dir() and not os.path.lexists(path):
            forget_tag_records(self.hub.store, path)

    def _present(self, lib: LibraryState) -> bool:
        """Pause a library whose root is missing (once), resume it when it is back."""
        there = lib.root.is_dir()
        if not there and not lib.paused:
            lib.paused = True
            if lib.watch is not None and self.unwatch is not None:
                self.unwatch(lib.watch)
            lib.watch = None
            logger.warning("library {}: paused: path missing", lib.root)
        elif there and lib.paused:
            lib.paused = False
            lib.watch = self._watch(lib.root)
            logger.info("library {}: resumed", lib.root)
        elif there and lib.watch is None:
            lib.watch = self._watch(lib.root)
        return there

    def _watch(self, root: Path) -> Any:
        if self.watch is None:
            return None
        try:
            return self.watch(root)
        except OSError as e:
            logger.warning("library {}: cannot watch it ({}); `hmctl rescan` tags what changed", root, e.strerror or e)
            return None

    def _heads(self, lib: LibraryState) -> dict[str, str]:
        """The library's heads that can tag now (trained for the active model): name -> the checkpoint's version."""
        hub = self.hub
        model = self.calls.model()
        if model is None:
            return {}
        wanted = lib.config.heads if lib.config.heads is not None else hub.ws.head_names()
        out = {}
        for head in wanted:
            summary = hub.checkpoints.summary(hub.ws.checkpoint_path(head))
            if summary is None or summary.get("error") or summary.get("model") != model.name:
                if lib.config.heads is not None:
                    why = "not trained yet" if summary is None else summary.get("error") or \
                        f"trained with model '{summary.get('model')}', the active model is '{model.name}'"
                    hub.tell_once(f"library:{lib.root}:{head}:{why}", f"library {lib.root}: head {head}: {why}; "
                                                                       "its tags wait")
                continue
            out[head] = str(summary.get("version") or "")
        return out

    def _tag(self, lib: LibraryState, stats: dict[str, tuple[int, int]]) -> None:
        hub = self.hub
        heads = self._heads(lib)
        if not heads:
            return
        current = tagged_images(hub.store, lib.root, stats, heads)
        with self.lock:
            lib.tagged -= set(stats) - current
            lib.tagged |= current
            todo = [Path(p) for p, st in sorted(stats.items()) if p not in current
                    and not (p in lib.failed and lib.failed[p][0] == st)]  # a failure is retried once the file changes
        chunk = hub.config.daemon.max_batch_images
        for start in range(0, len(todo), chunk):
            if hub.stopping.is_set() or lib.paused:
                return
            hub.set_activity(f"tagging library {lib.root}")
            part = todo[start : start + chunk]
            results, crashed = self.calls.call_per_file("tag", part, heads=sorted(heads), xmp=lib.config.xmp,
                                                        txt=lib.config.txt)
            written = [p for r in results for p in r["tagged"]]
            same = [p for r in results for p in r["unchanged"]]
            failed = [(p, reason) for r in results for p, reason in r["failed"]] + [(str(p), CRASHED) for p in crashed]
            for p in [p for p, reason in failed if reason == "file vanished"]:
                self.forget(Path(p))  # removed while it waited: not a failure
            failed = [(p, reason) for p, reason in failed if reason != "file vanished"]
            with self.lock:
                lib.tagged.update(written, same)
                for p, reason in failed:
                    lib.failed[p] = (size_and_mtime(Path(p)), reason)
                    lib.tagged.discard(p)
            for p, reason in failed:
                logger.warning("library {}: cannot tag {}: {}", lib.root, os.path.relpath(p, lib.root), reason)
            logger.info("library {}: tagged {} photo(s), {} unchanged, {} failed", lib.root, len(written), len(same),
                        len(failed))

    # -- hmctl status ------------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        out = []
        with self.lock:
            for lib in self.libraries:
                photos = set(lib.photos)
                tagged, failed = len(lib.tagged & photos), len(photos & set(lib.failed))
                out.append({"path": str(lib.root), "heads": lib.config.heads or "all", "photos": len(photos),
                            "tagged": tagged, "pending": len(photos) - tagged - failed, "failed": failed,
                            "paused": lib.paused})
        return out



def _library_state(config: LibraryConfig, workspace: Path) -> LibraryState:
    """A library as hmd keeps it: its root normalised; the workspace left out when it lies inside (its examples
    and sorted copies are not library photos)."""
    root = Path(os.path.normpath(config.root))
    return LibraryState(config, root, exclude=[workspace] if root in workspace.parents else [])


def _belongs(lib: LibraryState, path: Path) -> bool:
    return path == lib.root or lib.root in path.parents


def _wanted(lib: LibraryState, path: Path) -> bool:
    """A photo find_images would list: an image name, no hidden or NAS folder on the way, depth by `recursive`,
    not in an excluded folder."""
    try:
        parts = path.relative_to(lib.root).parts
    except ValueError:
        return False
    if any(x == path or x in path.parents for x in lib.exclude):
        return False
    if not parts or not is_image_name(parts[-1]) or (not lib.config.recursive and len(parts) > 1):
        return False
    return not any(p.startswith(".") or p in SKIP_FOLDERS for p in parts[:-1]) and not parts[-1].startswith(".") \
        and not path.is_symlink()
