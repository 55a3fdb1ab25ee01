"""hmd's worker process: the only part of the daemon that imports torch, decodes images and runs models.

Started by the supervisor (headmaster/daemon/worker_client.py) as
`python -m headmaster.daemon.worker --fd N --setup JSON`, it answers one request at a
time over the socketpair end it inherits (messages: headmaster/daemon/protocol.py) and
exits when that stream ends: when the supervisor stops it after `model_idle_seconds`
without work, stops itself, or dies. It never moves, renames or deletes an image: it
returns decisions and the supervisor places the files.

What the worker writes in headmaster.db: vectors (`embeddings`), the file index rows of
files it hashed (`files`), contents a model cannot use (`unusable`). Checkpoints in
out/ are written by `train` (atomically, as `hm train` does).

Operations (OPS below), each a plain function of keyword arguments returning JSON data:
  embed(paths)                      cache the vectors of these images
  train(head, epochs, lr, seed, kind, max_error)  train and save out/<head>.pt ([training] kind, max_error
                                    from the config when not given; a warm start when the buckets are the same)
  decide(head, paths)               a verdict per file: bucket, hash, score, or why it is unusable
  tag(paths, heads, xmp, txt)       library photos' sidecars, rewritten where a decision changed (tagged,
                                    unchanged, failed with reasons); never opens a photo for writing
  rank_uncertain(head, limit)       classified/<head>/uncertain/ by margin (as `hmctl uncertain`)
  rank_library(root, head, recursive, limit)  a library's photos nearest the head's cut, from cached vectors
                                    only (curation.rank_library): the review page's library queue
  default_model()                   the active model; registers the built-in backbone when none is
  warm(head)                        load the active model (one blank image through it) and the head's checkpoint:
                                    hmd asks while new inbox files settle, so their first request finds both ready
  suspects(head, folds, limit, epochs)  labelled examples the head doubts most (as `hm suspects`)
  figures(head)                     the review page's confusion matrix and `hm evaluate` figures
  hello()                           pid, for the start-up handshake

Test-only hooks, off unless the environment asks (tests/test_daemon_worker.py sets them):
  HEADMASTER_TEST_CRASH_ON=<substring>  decoding a file whose name contains it kills the worker (SIGKILL)
  HEADMASTER_TEST_DECIDE_DELAY=<s>      sleep this long in every `decide`, so a test can kill mid-batch
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from headmaster import HeadmasterError
from headmaster.daemon.protocol import WorkerGone, receive, send
from headmaster.embedding import Context, EmbedOptions
from headmaster.store import Store

if TYPE_CHECKING:
    from headmaster.workspace import Workspace

CRASH_ENV = "HEADMASTER_TEST_CRASH_ON"
DELAY_ENV = "HEADMASTER_TEST_DECIDE_DELAY"
OOM_SCORE_ADJ = 500  # raising our own score needs no privilege


class Worker:
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self._notices: list[str] = []  # one-off notices (the built-in model being prepared), for the supervisor
        ctx.notify = self._notices.append
        self._trained: dict[str, tuple[tuple[int, int, str], Any, Any]] = {}  # head -> (key, TrainedHead, Model)
        self.timings: dict[str, Any] | None = None  # the last embedding's numbers, sent with its answer (for the log)

    # -- helpers ---------------------------------------------------------------------
    def model_loaded(self) -> bool:
        # not imported yet: nothing loaded; the model is PyTorch's (embedders) or an ONNX Runtime session
        embedders = sys.modules.get("headmaster.embedding.embedders")
        onnx = sys.modules.get("headmaster.embedding.onnx.backbone")
        return bool(embedders is not None and embedders._CACHE) or bool(onnx is not None and onnx._OPEN)

    def _trained_head(self, head: str):
        """The head's checkpoint, loaded once per version of the file and active model."""
        from headmaster.heads import load_trained

        path = self.ctx.workspace.checkpoint_path(head)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise HeadmasterError(f"head '{head}' is not trained yet") from None
        model = self.ctx.active_model()
        key = (st.st_mtime_ns, st.st_size, model.name)
        hit = self._trained.get(head)
        if hit and hit[0] == key:
            return hit[1], hit[2]
        trained, model = load_trained(self.ctx, head)
        self._trained[head] = (key, trained, model)
        return trained, model

    # -- operations ------------------------------------------------------------------
    def hello(self) -> dict[str, Any]:
        return {"pid": os.getpid()}

    def embed(self, paths: list[str]) -> dict[str, Any]:
        from headmaster.embedding import embed_paths

        model = self.ctx.active_model()
        result = embed_paths(self.ctx.store, model, [Path(p) for p in paths], device=self.ctx.options.device,
                             progress=False, backend=self.ctx.options.backend)
        self.timings = embed_timings(result)
        return {"embedded": result.embedded, "skipped": [[str(s.path), s.reason] for s in result.skipped]}

    def default_model(self) -> dict[str, Any]:
        """The active model, registering the built-in backbone as `default` when none is registered."""
        name = self.ctx.active_model().name
        notices, self._notices[:] = list(self._notices), []
        return {"model": name, "notices": notices}

    def warm(self, head: str | None = None) -> dict[str, Any]:
        """Get ready to decide for `head`: the embedding model loaded and run once, the head's checkpoint loaded.
        A head that cannot be loaded (not trained, another model's) is left for `decide` to report."""
        from headmaster.embedding import warm_embedder

        started = time.perf_counter()
        model = self.ctx.active_model()
        warm_embedder(model, device=self.ctx.options.device, backend=self.ctx.options.backend)
        head_ready = False
        if head is not None:
            try:
                self._trained_head(head)
                head_ready = True
            except HeadmasterError:
                pass
        return {"model": model.name, "head": head_ready, "seconds": round(time.perf_counter() - started, 3)}

    def train(self, head: str, epochs: int, lr: float, seed: int, kind: str | None = None,
              max_error: float | None = None) -> dict[str, Any]:
        """Train as `hm train` does, with the config's `[training] kind` and `max_error` unless given: the goal
        holds across every retrain. An MLP starts from the previous weights when the buckets are unchanged."""
        from headmaster.config import load_config
        from headmaster.embedding import release_freed_memory
        from headmaster.heads import TrainConfig, train_one

        if kind is None or max_error is None:
            training = load_config(None, self.ctx.workspace.root).training  # $HEADMASTER_CONFIG or the workspace's
            kind = training.kind if kind is None else kind
            max_error = training.max_error if max_error is None else max_error
        # the config rules hmd's retrains: max_error 0 drops a goal an earlier `hm train --max-error` set
        config = TrainConfig(epochs=epochs, lr=lr, seed=seed, kind=kind, max_error=max_error, warm_start=True)
        try:
            report = train_one(self.ctx, head, config)
        finally:
            release_freed_memory()  # the worker may idle after this: give training's freed memory back
        self._trained.pop(head, None)
        return {"head_type": report.head_type, "images": report.images, "metrics": report.metrics,
                "kind": report.kind, "selection": report.selection, "error_goal": report.error_goal}

    def decide(self, head: str, paths: list[str]) -> dict[str, Any]:
        from headmaster.heads import decide_paths

        if delay := float(os.environ.get(DELAY_ENV, "0") or 0):
            time.sleep(delay)
        trained, model = self._trained_head(head)
        decisions, embedded = decide_paths(self.ctx, trained, model, [Path(p) for p in paths],
                                           label=f"Sorting {head}")
        self.timings = embed_timings(embedded)
        return {"decisions": [[str(d.path), d.bucket, d.hash, d.score] for d in decisions],
                "unusable": [[str(s.path), s.reason] for s in embedded.skipped]}

    def tag(self, paths: list[str], heads: list[str], xmp: bool = True, txt: bool = False) -> dict[str, Any]:
        """Tag library photos in place (curation.tagging.tag_images): only decisions that changed are rewritten."""
        from headmaster.curation import TagOptions, tag_images

        options = TagOptions(xmp=xmp, txt=txt, changed_decisions_only=True)
        report = tag_images(self.ctx, [Path(p) for p in paths], heads, options)
        changed: dict[str, bool] = {}
        failed: dict[str, str] = {}
        for a in report.actions:
            if a.note and a.what != "kept":  # a .txt not ours is kept, and the photo still counts as tagged
                failed.setdefault(str(a.image), f"{a.sidecar.name}: {a.note}")
            elif a.what in ("written", "updated"):
                changed[str(a.image)] = True
            else:
                changed.setdefault(str(a.image), False)
        for s in report.skipped:
            failed[str(s.path)] = s.reason
        return {"tagged": sorted(p for p, c in changed.items() if c and p not in failed),
                "unchanged": sorted(p for p, c in changed.items() if not c and p not in failed),
                "failed": sorted([p, r] for p, r in failed.items())}

    def rank_uncertain(self, head: str, limit: int | None = None) -> list[dict[str, Any]]:
        from headmaster.curation import rank_uncertain

        return [{"path": str(u.path), "guess": u.bucket, "score": round(u.score, 4), "margin": round(u.margin, 4)}
                for u in rank_uncertain(self.ctx, head, limit)]

    def rank_library(self, root: str, head: str, recursive: bool = True, limit: int | None = None
                     ) -> dict[str, Any]:
        from headmaster.curation import rank_library

        return rank_library(self.ctx, Path(root), head, recursive, limit).to_dict()

    def suspects(self, head: str, folds: int = 5, limit: int | None = None, epochs: int | None = None
                 ) -> dict[str, Any]:
        from headmaster.curation import find_suspects
        from headmaster.heads import TrainConfig

        config = TrainConfig() if epochs is None else TrainConfig(epochs=epochs)
        report = find_suspects(self.ctx, head, folds=folds, config=config, limit=limit)
        return {"head": head, "folds": report.folds, "total": report.total, "warnings": report.warnings,
                "skipped": [[str(s.path), s.reason] for s in report.skipped],
                "suspects": [{"path": str(s.path), "hash": s.hash, "bucket": s.bucket,
                              "p_bucket": round(s.probability, 4), "preferred": s.preferred,
                              "p_preferred": round(s.preferred_probability, 4)} for s in report.suspects]}

    def figures(self, head: str) -> dict[str, Any]:
        """The review page's test-set confusion matrix (when test/<head>/ exists) and `hm evaluate` figures."""
        from headmaster.evaluation import confusion_figures, confusion_matrix, evaluate_head, evaluation_figures

        ws = self.ctx.workspace
        parts = {}
        if (ws.test_dir / head).is_dir():
            parts["confusion"] = confusion_figures(confusion_matrix(self.ctx, head), ws.root)
        parts["evaluate"] = evaluation_figures(evaluate_head(self.ctx, head, ["mlp", "prototype", "logreg"],
                                                            repeats=10))
        return parts


def embed_timings(result: Any) -> dict[str, Any]:
    """An EmbedResult's numbers that hmd's log shows per request (seconds: the whole embed_paths call)."""
    return {"seconds": round(result.seconds, 3), "load_seconds": round(result.load_seconds, 3),
            "embed_seconds": round(result.embed_seconds, 3), "hashed": result.hashed, "embedded": result.embedded}


OPS: dict[str, Callable[..., Any]] = {name: getattr(Worker, name) for name in (
    "hello", "embed", "default_model", "warm", "train", "decide", "tag", "rank_uncertain", "rank_library",
    "suspects", "figures")}


class LocalWorker:
    """The worker's operations on one thread of this process: the review page under `hm serve`, without hmd.

    `call` has the shape of hmd's `worker_call` (op, **args), so the page cannot tell the two apart. The
    model loads on that thread at the first operation that needs it; `close` releases the database.
    """

    def __init__(self, ws: "Workspace", options: EmbedOptions | None = None):
        self.ws = ws
        self.options = options or EmbedOptions(progress=False)
        self._executor: ThreadPoolExecutor | None = None
        self._worker: Worker | None = None  # over our own Context, on the executor's thread

    def call(self, op: str, **args: Any) -> Any:
        def run() -> Any:
            if self._worker is None:
                self._worker = Worker(Context(self.ws, Store(self.ws.db_path), self.options))
            return OPS[op](self._worker, **args)

        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="hm-serve-model")
        return self._executor.submit(run).result()

    def close(self) -> None:
        if self._executor is not None:
            if self._worker is not None:
                self._executor.submit(self._worker.ctx.close).result()
            self._executor.shutdown()
            self._executor = None


def install_test_hooks() -> None:
    """The test-only crash hook, off unless HEADMASTER_TEST_CRASH_ON is set: decoding a file whose name
    contains that text kills this process with SIGKILL, as a segfault in a decoder would."""
    needle = os.environ.get(CRASH_ENV)
    if not needle:
        return
    from headmaster.embedding import pipeline

    decode = pipeline.load_image

    def load_image(path, *args, **kwargs):
        if needle in Path(path).name:
            os.kill(os.getpid(), signal.SIGKILL)
        return decode(path, *args, **kwargs)

    pipeline.load_image = load_image


def answer(worker: Worker | None, setup_error: str | None, message: dict[str, Any]) -> dict[str, Any]:
    op, args = message.get("op"), message.get("args") or {}
    if setup_error is not None or worker is None:
        return {"ok": False, "error": setup_error or "worker not set up", "kind": "user"}
    if op not in OPS:
        return {"ok": False, "error": f"unknown worker operation {op!r}", "kind": "bug"}
    try:
        return {"ok": True, "result": OPS[op](worker, **args)}
    except HeadmasterError as e:
        return {"ok": False, "error": str(e), "kind": "user"}
    except Exception as e:  # a bug: report it in one line; the traceback goes to stderr (the journal)
        import traceback

        traceback.print_exc()
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "kind": "bug"}


def serve(sock: socket.socket, setup: dict[str, Any]) -> None:
    worker, setup_error = None, None
    try:
        options = EmbedOptions(device=setup.get("device") or None, progress=False, backend=setup.get("backend"),
                               max_pixels=setup.get("max_pixels"))  # [embedding] max_pixels: the bomb limit
        worker = Worker(Context.open(setup["workspace"], options))
    except HeadmasterError as e:
        setup_error = str(e)  # every request gets this answer; the supervisor reports it
    ready_at: float | None = time.time()  # set up: told to the supervisor with the first answer (for the log)
    while True:
        try:
            message = receive(sock)
        except WorkerGone:
            return
        reply = answer(worker, setup_error, message)
        reply["loaded"] = worker is not None and worker.model_loaded()
        if worker is not None and worker.timings is not None:
            reply["timings"], worker.timings = worker.timings, None
        if ready_at is not None:
            reply["ready_at"], ready_at = ready_at, None
        try:
            send(sock, reply)
        except OSError:
            return


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="headmaster.daemon.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="the inherited socket to serve")
    parser.add_argument("--setup", required=True, help="JSON: workspace, device, backend, max_pixels")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C at hmd's terminal is the supervisor's to handle
    try:  # under memory pressure the kernel should pick the worker, which hmd survives, not the supervisor
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(OOM_SCORE_ADJ))
    except OSError:
        pass
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sock = socket.socket(fileno=args.fd)
    install_test_hooks()
    try:
        serve(sock, json.loads(args.setup))
    finally:
        sock.close()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown of torch's threads: nothing is left to flush


if __name__ == "__main__":
    main()
