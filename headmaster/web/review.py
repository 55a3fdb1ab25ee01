"""The review page's backend in-process: what `hm serve` runs, and what hmd runs on its worker.

Labelling a queue image moves it from classified/<head>/uncertain/ (or the bucket it was
sorted into) into classified/<head>/<bucket>/ with the crash-safe move, then `learn()` makes it
an example exactly as the daemon does when a user moves the file by hand. Suspects move
between buckets of heads/<head>/ or out into heads/<head>/_excluded/. Every action is kept
on an undo stack; undo puts the file back and unlearns what was learned.

A library queue (`library_queue`) shows the photos of a [[library]] nearest a head's cut, ranked by the
worker from the vectors cached when the library was tagged (curation.rank_library). Labelling one
COPIES it into heads/<head>/<bucket>/ (curation.learn_copy): the library's file stays where it is,
never moved or opened for writing; undo removes the copy again. The head retrains as with any new
example (under hmd, its watcher sees the file in heads/).

Model work (ranking, suspects, evaluation) goes through the `model_call(op, **args)` it is given:
the named operations of hmd's worker (headmaster/daemon/worker.py, returning plain JSON data).
Under hmd they go to the worker process; under `hm serve`, to a thread of that process
(daemon.worker.LocalWorker). Whoever runs the page passes in what it needs of them (`teach`, `live`),
so this module knows nothing of the daemon. It imports no torch, so hmd's supervisor serves the page
without it. File moves and the corrections log use this object's own database connection, so a
label never waits for a retrain.
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from headmaster import HeadmasterError
from headmaster.config import LibraryConfig
from headmaster.curation import (NOT_LABELS, Learned, check_bucket_name, ensure_schema, learn, learn_copy, record_skip,
                                 review_skips, unlearn, unlearn_copy)
from headmaster.embedding import hash_paths
from headmaster.evaluation import indexed_leaks, read_figures, save_figures
from headmaster.fileops import move_into
from headmaster.heads import UNCERTAIN, CheckpointCache, HeadRules, head_fields
from headmaster.store import FileRecord, Store
from headmaster.web.backend import EXCLUDED, Action, Item, LibraryQueue, NotFound, library_names
from headmaster.workspace import MIN_BUCKET_IMAGES, NOT_BUCKET_PREFIXES, LabelledSet, Workspace, list_images, shown_path

RECENT_SORTS = 200  # how many recent sorts the queue looks at after the uncertain ones
SUSPECT_FOLDS = 5
SUSPECT_EPOCHS = 30


ModelCall = Callable[..., Any]  # (op, **args) -> JSON data: a named operation of the model worker
Teach = Callable[[Store, str, str, Path, str], Learned]  # (store, head, bucket, path, hash) -> what was learned


class ReviewService:
    """The ReviewBackend over one workspace (see headmaster/web/backend.py).

    `model_call` runs the model operations; `teach` makes a labelled file an example (default: `learn()`
    at once, the head retrains on the next `hm train`); `live` adds what a daemon knows to the status
    (retrains, pending retrain, inbox, the libraries' counts); `libraries` are the config's [[library]] tables,
    whose photos the library queues show.
    """

    def __init__(self, ws: Workspace, model_call: ModelCall, teach: Teach | None = None,
                 live: Callable[[], dict[str, Any]] | None = None, libraries: list[LibraryConfig] | None = None):
        self.ws = ws
        # roots as hmd keeps them (normalised), so the page's paths and hmd's counts match
        self._libraries = library_names([replace(lib, path=os.path.normpath(lib.root)) for lib in libraries or []])
        self.model_call = model_call
        self._teach = teach
        self._live = live
        self.store = Store(ws.db_path)  # file moves and the corrections log; never the model
        ensure_schema(self.store)
        self._lock = threading.RLock()  # one action at a time: moves and the undo stack stay in step
        self._undo: list[tuple[Action, Item, Path, Path]] = []  # (action, item before, path before, path after)
        self._paths: dict[str, Path] = {}  # id -> where the image was when we last showed it
        self._items: dict[tuple[str, str], Item] = {}  # (head, id) -> the item shown
        self._suspects: dict[str, tuple[tuple[int, int] | None, list[Item]]] = {}  # head -> (checkpoint key, items)
        self._leaks: dict[str, tuple[tuple, list[str]]] = {}  # head -> (its folders' state, the leak warnings)
        self.leak_checks = 0  # how often the leak check really ran (the status poll serves the stored result)
        self._skipped = review_skips(self.store)  # (head, id) the user skipped: not shown again (kept in the db)
        self._checkpoints = CheckpointCache()

    @property
    def workspace_root(self) -> Path:
        return self.ws.root

    def close(self) -> None:
        self.store.close()

    def teach(self, head: str, bucket: str, path: Path, hash_: str) -> Learned:
        """Make the labelled file an example, on this object's own database connection."""
        if self._teach is not None:
            return self._teach(self.store, head, bucket, path, hash_)
        return learn(self.store, self.ws, head, bucket, path, hash_, "correction")

    def live(self) -> dict[str, Any]:
        return self._live() if self._live is not None else {}

    # -- reading ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        live = self.live()
        live_heads = live.get("heads", {})
        heads: dict[str, Any] = {}
        for name in self.ws.head_names():
            try:
                labelled = self.ws.head(name)
            except HeadmasterError:
                continue  # removed while we looked
            ck = self._checkpoints.summary(self.ws.checkpoint_path(name)) or {}
            errors, warnings = labelled.problems()
            heads[name] = {
                **head_fields(labelled, ck),
                "uncertain": _count_images(self.ws.classified_dir / name / UNCERTAIN),
                "excluded": _count_images(self.ws.heads_dir / name / EXCLUDED),
                "warnings": errors + warnings + self._leak_warnings(name, labelled),
                **{k: v for k, v in live_heads.get(name, {}).items() if k not in ("buckets", "metrics")},
            }
        out = {"daemon": bool(live), "workspace": str(self.ws.root), "heads": heads}
        for key in ("pid", "model", "activity", "paused", "inbox", "uptime_s", "errors"):
            if key in live:
                out[key] = live[key]
        if self._libraries or live.get("libraries"):
            out["libraries"] = self._library_status(live.get("libraries") or [])
        return out

    def _library_status(self, counted: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each library: its name and path, and (under hmd) photos, tagged, pending, failed, paused."""
        by_path = {c.get("path"): c for c in counted}
        out = [{**by_path.pop(str(lib.root), {}), **self._library_info(name, lib)}
               for name, lib in self._libraries.items()]
        return out + list(by_path.values())  # hmd counts a library the page was not told of: shown, no queue

    def _library_info(self, name: str, lib: LibraryConfig) -> dict[str, Any]:
        return {"name": name, "path": str(lib.root), "heads": "all" if lib.heads is None else list(lib.heads)}

    def libraries(self, head: str | None = None) -> list[dict[str, Any]]:
        return [self._library_info(name, lib) for name, lib in self._libraries.items()
                if head is None or lib.heads is None or head in lib.heads]

    def library_queue(self, head: str, library: str, limit: int) -> LibraryQueue:
        self._known_head(head)
        lib = self._libraries.get(library)
        if lib is None or (lib.heads is not None and head not in lib.heads):
            raise NotFound(f"head '{head}' tags no library '{library}'")
        root = lib.root
        if not root.is_dir():
            raise HeadmasterError(f"library {root} is not there (an unmounted disk?)")
        if not self.ws.checkpoint_path(head).exists():
            return LibraryQueue(library, str(root), 0, 0, 0, 0)
        with self._lock:
            skipped = sum(1 for h, _ in self._skipped if h == head)
        # the worker ranks from cached vectors only: a database read and one matrix product, no decoding
        found = self.model_call("rank_library", root=str(root), head=head, recursive=lib.recursive,
                                limit=limit + skipped)
        chosen = []
        with self._lock:
            for x in found["ranked"]:
                path = Path(x["path"])
                if (head, x["hash"]) in self._skipped:
                    continue
                chosen.append((Item(x["hash"], head, path.name, "library", None, x["guess"], x["score"],
                                    x["margin"], library, shown_path(path, root)), path))
        chosen = _unique(chosen)[:limit]
        self._remember(chosen)
        return LibraryQueue(library, str(root), found["photos"], found["scored"], found["waiting"],
                            found["examples"], [i for i, _ in chosen])

    def _leak_warnings(self, head: str, labelled: LabelledSet) -> list[str]:
        """indexed_leaks's warnings, computed again only when the head's or its test set's folders change (or,
        while some images are not indexed yet, when the database does)."""
        key = _folders_key([labelled.path, *(b.path for b in labelled.buckets)], self.ws.test_dir / head)
        with self._lock:  # our connection serves one thread at a time
            cached = self._leaks.get(head)
            if cached is not None and cached[0][0] == key and cached[0][1] in (None, self._data_version()):
                return cached[1]
            leaks, unknown = indexed_leaks(self.ws, self.store, head, labelled)
            self.leak_checks += 1
            warnings = [leak.describe(self.ws.root) for leak in leaks]
            self._leaks[head] = ((key, self._data_version() if unknown else None), warnings)
            return warnings

    def _data_version(self) -> int:
        return self.store.conn.execute("PRAGMA data_version").fetchone()[0]

    def queue(self, head: str, limit: int) -> list[Item]:
        classes = self._known_head(head).classes
        uncertain = self.ws.classified_dir / head / UNCERTAIN
        found = []
        if self.ws.checkpoint_path(head).exists() and _count_images(uncertain):
            # a failure here (the worker down, a damaged checkpoint) is the page's error, not an empty queue
            found = self.model_call("rank_uncertain", head=head)
        paths = [Path(u["path"]) for u in found]
        with self._lock:  # our connection serves one thread at a time
            hashes, _, _ = hash_paths(self.store, paths)
        ranked = [(Item(hashes[p], head, p.name, "uncertain", None, u["guess"],
                        _probability(classes, u["guess"], u["score"]), u["margin"]), p)
                  for u, p in zip(found, paths) if p in hashes]
        seen = {i.id for i, _ in ranked}
        with self._lock:
            recent = [(i, p) for i, p in self._recent_sorts(head, classes, limit) if i.id not in seen]
        with self._lock:
            chosen = [(i, p) for i, p in _unique(ranked + recent) if (head, i.id) not in self._skipped][:limit]
        self._remember(chosen)
        return [i for i, _ in chosen]

    def _recent_sorts(self, head: str, classes: list[str], limit: int) -> list[tuple[Item, Path]]:
        """Files the head sorted into a bucket lately, still there and not yet corrected, newest first."""
        out: list[tuple[Item, Path]] = []
        rows = self.store.conn.execute(
            "SELECT destination, hash, bucket, score FROM sorts WHERE head = ? AND hash IS NOT NULL "
            "ORDER BY id DESC LIMIT ?", (head, RECENT_SORTS)).fetchall()
        base = self.ws.classified_dir / head
        for destination, hash_, bucket, score in rows:
            path = Path(destination)
            if bucket in NOT_LABELS or bucket.startswith(("_", ".")) or path.parent != base / bucket:
                continue
            if not path.exists() or self._learned(head, hash_):
                continue
            out.append((Item(hash_, head, path.name, "sorted", bucket, bucket, _probability(classes, bucket, score)),
                        path))
            if len(out) >= limit:
                break
        return out

    def _learned(self, head: str, hash_: str) -> bool:
        row = self.store.conn.execute("SELECT kind FROM corrections WHERE head = ? AND hash = ? ORDER BY id DESC "
                                      "LIMIT 1", (head, hash_)).fetchone()
        return row is not None and row[0] != "unlearned"

    def suspects(self, head: str, limit: int) -> list[Item]:
        return self._doubted(head)[:limit]

    def suspects_total(self, head: str) -> int:
        return len(self._doubted(head))

    def _doubted(self, head: str) -> list[Item]:
        """Every example the out-of-fold scores put in doubt, most suspect first (the scores are kept until the
        checkpoint changes: a retrain); `hm suspects` lists every example, the page only these."""
        labelled = self._known_head(head)
        path = self.ws.checkpoint_path(head)
        key = _stat_key(path)
        cached = self._suspects.get(head)
        if cached is None or cached[0] != key:
            # a head that cannot be scored yet: HeadmasterError, shown on the page
            report = self.model_call("suspects", head=head, folds=SUSPECT_FOLDS, epochs=SUSPECT_EPOCHS)
            rules = _rules(labelled, self._checkpoints.summary(path) or {})
            found = [(Item(x["hash"], head, Path(x["path"]).name, "example", x["bucket"], x["preferred"],
                           x["p_bucket"]), Path(x["path"])) for x in report["suspects"]
                     if rules.doubts(x["bucket"], x["p_bucket"], x["preferred"])]
            with self._lock:
                self._remember(found)
                self._suspects[head] = (key, [i for i, _ in found])
        with self._lock:  # drop the ones moved since (an action, or by hand)
            return [i for i in self._suspects[head][1] if self._paths.get(i.id) and self._paths[i.id].exists()
                    and self._paths[i.id].parent.name == i.bucket and (head, i.id) not in self._skipped]

    def details(self, head: str) -> dict[str, Any]:
        self._known_head(head)
        status = self.status()["heads"].get(head, {})
        figures = read_figures(self.ws, head)
        return {"head": head, "status": status, "evaluation": figures}

    def evaluate(self, head: str) -> dict[str, Any]:
        self._known_head(head)

        return save_figures(self.ws, head, **self.model_call("figures", head=head))

    def image_path(self, id: str) -> Path:
        with self._lock:
            path = self._paths.get(id)
        if path is None or not path.exists():
            raise NotFound(f"no image {id}")
        return path

    # -- changing ---------------------------------------------------------------------------
    def label(self, head: str, id: str, bucket: str) -> Action:
        if head not in self.ws.head_names() or "/" in bucket or bucket.startswith(NOT_BUCKET_PREFIXES) \
                or not (self.ws.heads_dir / head / bucket).is_dir():  # not a scan of every image: this runs per key
            raise NotFound(f"head '{head}' has no bucket '{bucket}'")
        with self._lock:
            item, path = self._current(head, id)
            if item.where == "library":
                return self._copy_in(item, path, bucket)
            if item.where == "example":
                return self._push(item, path, "move", bucket, move_into(path, self.ws.heads_dir / head / bucket))
            if item.where == "sorted" and item.bucket == bucket:
                return self._push(item, path, "keep", bucket, path)
            moved = move_into(path, self.ws.classified_dir / head / bucket)
            _index(self.store, moved, id)  # the watcher finds its hash without reading the file again
            learned = self.teach(head, bucket, moved, id)
            return self._push(item, path, "label", bucket, moved, learned)

    def new_bucket(self, head: str, id: str, name: str) -> Action:
        """Make heads/<head>/<name>/ with this image as its first example; undo takes the folder away again.

        A queue image moves to classified/<head>/<name>/ and teaches the head, as a label does; an example
        moves into the new folder. The head trains with the new class from its next retrain.
        """
        self._known_head(head)
        name = check_bucket_name(name)
        folder = self.ws.heads_dir / head / name
        if folder.exists():
            raise HeadmasterError(f"head '{head}' already has a folder {name!r}: label into it instead")
        with self._lock:
            item, path = self._current(head, id)
            folder.mkdir()
            try:
                if item.where == "library":
                    return self._copy_in(item, path, name, created=True)
                if item.where == "example":
                    after, learned = move_into(path, folder), None
                else:
                    after = move_into(path, self.ws.classified_dir / head / name)
                    _index(self.store, after, id)
                    learned = self.teach(head, name, after, id)
            except BaseException:
                _remove_if_empty(folder)
                raise
            more = MIN_BUCKET_IMAGES - len(list_images(folder)[0])
            return self._push(item, path, "move" if learned is None else "label", name, after, learned,
                              created=True, note=_new_bucket_note(head, name, more))

    def _copy_in(self, item: Item, path: Path, bucket: str, created: bool = False) -> Action:
        """A library photo becomes an example by a copy in heads/<head>/<bucket>/; the photo stays as it is."""
        learned = learn_copy(self.store, self.ws, item.head, bucket, path, item.id)
        more = MIN_BUCKET_IMAGES - len(list_images(self.ws.heads_dir / item.head / bucket)[0])
        action = self._push(item, path, "copy", bucket, learned.example, learned, created=created,
                            note=_new_bucket_note(item.head, bucket, more) if created else None,
                            previous=learned.previous if learned.action == "moved" else None)
        self._paths[item.id] = path  # the page goes on showing the library's photo, never the copy
        return action

    def skip(self, head: str, id: str) -> Action:
        self._known_head(head)
        with self._lock:
            item, path = self._current(head, id)
            self._skipped.add((head, id))
            record_skip(self.store, head, id)
            return self._push(item, path, "skip", item.bucket or UNCERTAIN, path)

    def exclude(self, head: str, id: str) -> Action:
        self._known_head(head)
        with self._lock:
            item, path = self._current(head, id)
            if item.where != "example":
                raise NotFound(f"only training examples can be excluded; {item.name} is in classified/")
            return self._push(item, path, "exclude", EXCLUDED, move_into(path, self.ws.heads_dir / head / EXCLUDED))

    def undo(self) -> Action | None:
        with self._lock:
            if not self._undo:
                return None
            action, item, before, after = self._undo.pop()
            if action.kind == "skip":
                self._skipped.discard((action.head, action.id))
                record_skip(self.store, action.head, action.id, skipped=False)
            if action.kind in ("keep", "skip"):
                return action
            if not after.exists():
                raise NotFound(f"{shown_path(after, self.ws.root)} is gone; nothing to undo")
            if action.kind == "copy":
                self._uncopy(action, item, before, after)
                return action
            back = move_into(after, before.parent, before.name)
            _index(self.store, back, item.id)
            if action.kind == "label":
                self._unteach(action, item, back)
            if action.created:  # the bucket the action made goes again, unless someone filled it meanwhile
                _remove_if_empty(self.ws.heads_dir / action.head / action.bucket)
                _remove_if_empty(self.ws.classified_dir / action.head / action.bucket)
            self._paths[item.id] = back
            return action

    def _uncopy(self, action: Action, item: Item, before: Path, after: Path) -> None:
        """Undo a library photo's copy: the copy goes (the photo is still in its library), or an example it moved
        goes back to its bucket; a bucket the label made goes again while empty."""
        try:
            if action.learned == "added":
                unlearn_copy(self.store, action.head, item.id, after, before)
            elif action.learned == "moved" and action.previous:
                learn_copy(self.store, self.ws, action.head, action.previous, before, item.id)
        except HeadmasterError:
            self._undo.append((action, item, before, after))  # still undoable once the reason is gone
            raise
        if action.created:
            _remove_if_empty(self.ws.heads_dir / action.head / action.bucket)
        self._paths[item.id] = before

    def _unteach(self, action: Action, item: Item, back: Path) -> None:
        """Undo what `learn` did: remove an added example, move a moved one back."""
        if action.learned == "added":
            unlearn(self.store, self.ws, action.head, back)
        elif action.learned == "moved" and item.bucket is not None:
            self.teach(action.head, item.bucket, back, item.id)

    def restore_item(self, action: Action) -> Item | None:
        with self._lock:
            return self._items.get((action.head, action.id))

    # -- bookkeeping ------------------------------------------------------------------------
    def _known_head(self, head: str):
        if head not in self.ws.head_names():
            raise NotFound(f"unknown head '{head}'")
        return self.ws.head(head)

    def _remember(self, items: list[tuple[Item, Path]]) -> None:
        with self._lock:
            for item, path in items:
                self._paths[item.id] = path
                self._items[(item.head, item.id)] = item

    def _current(self, head: str, id: str) -> tuple[Item, Path]:
        item = self._items.get((head, id))
        path = self._paths.get(id)
        if item is None or path is None:
            raise NotFound(f"no image {id} in head '{head}'")
        if not path.exists():
            raise NotFound(f"{shown_path(path, self.ws.root)} was moved meanwhile; reload the page")
        return item, path

    def _push(self, item: Item, before: Path, kind: str, bucket: str, after: Path,
              learned: Learned | None = None, created: bool = False, note: str | None = None,
              previous: str | None = None) -> Action:
        action = Action(kind, item.head, item.id, item.name, bucket, shown_path(before, self.ws.root),
                        shown_path(after, self.ws.root), learned.action if learned else None, created, note,
                        previous)
        self._undo.append((action, item, before, after))
        self._paths[item.id] = after
        return action


def _new_bucket_note(head: str, name: str, more: int) -> str:
    return (f"new bucket '{name}' for head '{head}': the head trains with it from its next retrain"
            + (f"; add {more} more example{'s' if more != 1 else ''} ({MIN_BUCKET_IMAGES} recommended)"
               if more > 0 else ""))


def _rules(labelled: LabelledSet, ck: dict[str, Any]) -> HeadRules:
    """The head's cuts from its checkpoint summary; the defaults while its buckets differ from the checkpoint's."""
    if ck.get("classes") == labelled.classes:
        return HeadRules({"type": ck["type"], "classes": ck["classes"], "threshold": ck.get("threshold"),
                          "min_confidence": ck.get("min_confidence")})
    return HeadRules({"type": labelled.head_type, "classes": labelled.classes})


def _folders_key(folders: list[Path], test: Path | None = None) -> tuple:
    """What changes when an image is added, removed or renamed in these folders or in the test set's."""
    if test is not None and test.is_dir():
        folders = [*folders, test, *(p for p in test.iterdir() if p.is_dir())]
    key = []
    for folder in folders:
        try:
            st = os.stat(folder)
        except FileNotFoundError:
            continue
        key.append((str(folder), st.st_mtime_ns, st.st_ino))
    return tuple(key)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only ever an empty folder: never an image
    except OSError:
        pass


def _probability(classes: list[str], bucket: str, score: float | None) -> float | None:
    """The probability of `bucket` from a decision's score (binary scores are the probability of classes[1])."""
    if score is None:
        return None
    p = 1.0 - float(score) if len(classes) == 2 and bucket == classes[0] else float(score)
    return round(p, 4)


def _unique(items: list[tuple[Item, Path]]) -> list[tuple[Item, Path]]:
    seen: set[str] = set()
    out = []
    for item, path in items:
        if item.id not in seen:
            seen.add(item.id)
            out.append((item, path))
    return out


def _index(store: Store, path: Path, hash_: str) -> None:
    st = os.stat(path)
    store.put_file_records([FileRecord(str(path), st.st_size, st.st_mtime_ns, st.st_ino, hash_)])


def _stat_key(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


def _count_images(folder: Path) -> int:
    return len(list_images(folder)[0]) if folder.is_dir() else 0
