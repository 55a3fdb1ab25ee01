"""The job thread's calls to the worker, and what happens when the worker dies in one.

A worker that dies in a call (segfault, OOM kill, kill -9) is logged and restarted on the
next call: a plain call is retried once (`call`); a call over files retries each of those
files once, on its own, and a file that kills the worker again is remembered as unusable
for the active model, so neither hmd nor hm decodes it again (`call_per_file`). Also here:
the active model (the worker registers the built-in `default` when there is none) and the
examples' vectors (`embed`: only files the cache lacks go to the worker).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loguru import logger

from headmaster import HeadmasterError
from headmaster.daemon.hub import Hub
from headmaster.daemon.worker_client import WorkerCrashed
from headmaster.embedding import DECODER_VERSION, file_sha256, scan_paths
from headmaster.store import Model

CRASHED = "crashed the decoder"  # the reason given for a file that killed the worker twice


class Calls:
    def __init__(self, hub: Hub):
        self.hub = hub

    # -- the model ------------------------------------------------------------------------
    def model(self) -> Model | None:
        try:
            return self.hub.store.active_model() if self.hub.store.models() else self.register_default_model()
        except HeadmasterError as e:
            self.hub.tell_once("model", f"{e}; then `hmctl rescan`")
            return None

    def register_default_model(self) -> Model:
        """No model registered yet: the worker registers the built-in backbone as `default` (preparing it
        needs torch, which the supervisor never imports) and says so in one line."""
        for notice in self.call("default_model")["notices"]:
            logger.info(notice)
        return self.hub.store.active_model()

    # -- calls that survive a crash ------------------------------------------------------
    def call(self, op: str, **args: Any) -> Any:
        """A worker call that is retried once if the worker dies in it."""
        try:
            return self._call(op, **args)
        except WorkerCrashed as e:
            if self.hub.stopping.is_set():
                raise
            self.worker_crashed(e, 0)
        return self._call(op, **args)

    def _call(self, op: str, **args: Any) -> Any:
        """One worker call; its end, answered or not, is progress for the watchdog (daemon/heartbeat.py)."""
        try:
            return self.hub.worker.call(op, **args)
        finally:
            self.hub.heartbeat.beat()

    def call_per_file(self, op: str, paths: list[Path], remember: bool = True, **args: Any
                      ) -> tuple[list[Any], list[Path]]:
        """Run `op` over `paths` in the worker; if the worker dies, retry each of those files once, alone.

        Returns (the results, the files that crashed the worker a second time). Those are remembered as
        unusable for the active model, so neither hmd nor hm decodes them again (until Pillow changes);
        with `remember=False` the caller does that (`remember_crashes`): this then touches no database,
        so it may run on another thread than the job thread (the sorter's next request, ahead of its moves).
        """
        try:
            return [self._call(op, paths=[str(p) for p in paths], **args)], []
        except WorkerCrashed as e:
            if self.hub.stopping.is_set():
                raise
            self.worker_crashed(e, len(paths))
        results, crashed = [], []
        for path in paths:
            try:
                results.append(self._call(op, paths=[str(path)], **args))
            except WorkerCrashed as e:
                if self.hub.stopping.is_set():
                    raise
                self.worker_crashed(e, 1)
                crashed.append(path)
        if remember:
            self.remember_crashes(crashed)
        return results, crashed

    def worker_crashed(self, error: WorkerCrashed, files: int) -> None:
        self.hub.state.count("errors")
        logger.error("{}; restarting it{}", error, f" and retrying its {files} file(s) one by one" if files > 1
                     else " and retrying the file once" if files == 1 else "")

    def remember_crashes(self, paths: list[Path]) -> None:
        model = self.model()
        if model is None:
            return
        found = []
        for path in paths:
            logger.error("{} crashed the worker twice: never decoded again by this model", path)
            try:
                found.append((file_sha256(path), CRASHED))
            except OSError:
                pass
        self.hub.store.put_unusable(model.id, found, DECODER_VERSION)

    # -- the examples' vectors -----------------------------------------------------------
    def embed(self, model: Model, paths: list[Path], head: str) -> None:
        """Make sure the examples have vectors: only files the cache lacks go to the worker."""
        todo, unusable = self.uncached(model, paths)
        for path, reason in unusable:
            self.unreadable_example(path, reason)
        chunk = self.hub.config.daemon.max_batch_images
        for start in range(0, len(todo), chunk):
            if self.hub.stopping.is_set():
                return
            self.hub.set_activity(f"embedding {head}")
            results, crashed = self.call_per_file("embed", todo[start : start + chunk])
            embedded = sum(r["embedded"] for r in results)
            if embedded:
                logger.info("head {}: embedded {} new image(s)", head, embedded)
            for path_, reason in (s for r in results for s in r["skipped"]):
                if reason != "file vanished":
                    self.unreadable_example(Path(path_), reason)
            for path in crashed:
                self.unreadable_example(path, CRASHED)

    def unreadable_example(self, path: Path, reason: str) -> None:
        if self.hub.tell_once(f"unreadable:{path}", f"cannot use example {path}: {reason}"):
            self.hub.state.count("unreadable_examples")

    def uncached(self, model: Model, paths: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
        """(files the worker must embed, known files the model cannot use with their reasons), from the
        file index and the cache alone: an unchanged, cached labelled set never wakes the worker."""
        store = self.hub.store
        scan = scan_paths(store, paths, model.id)
        missing = {p: h for p, h in scan.known.items() if h not in scan.cached}
        bad = store.unusable(model.id, set(missing.values()), DECODER_VERSION) if missing else {}
        todo = [p for p, h in missing.items() if h not in bad] + [p for p, _, _ in scan.to_read]
        return todo, [(p, bad[h]) for p, h in missing.items() if h in bad]
