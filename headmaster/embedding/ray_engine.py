"""`hm embed --engine ray`: the embedding pipeline on a Ray cluster, built on Ray Data.

The driver lists the files, asks the cache what is done (the file index for files it has seen, the
cached hashes for the rest) and runs one Ray Data pipeline over what is left:

    paths -> map_batches(decode_batch)      CPU tasks: read, SHA-256, decode at reduced size, preprocess
          -> map_batches(EmbedActor)        an actor pool: the model loaded once per actor, pixels -> vectors
          -> iter_batches on the driver     vectors into headmaster.db (or Parquet with `out`), per batch

Decoding and preprocessing are the local engine's own (pipeline.prepare_image), the model is loaded with
the usual backend_embedder (ONNX Runtime on CPU actors when the model exports, PyTorch on GPUs), so the
vectors are the local engine's and land under the same model id and content hashes. A file that fails
comes back as a row with its reason and is recorded as the local engine records it. Actors that die are
restarted and their batches retried by Ray (max_restarts, max_task_retries); rows delivered twice are
counted once, and the cache is written by content hash, so nothing is embedded twice into it.

Every path must be readable at the same path on every worker (NFS or another shared mount): the driver
checks a sample on each node first. `ray` is imported inside functions only: nothing else pays for it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from headmaster import HeadmasterError
from headmaster.embedding.backends import backend_embedder, check_backend
from headmaster.embedding.images import DECODER_VERSION, ImageError, ImageUnavailable, file_sha256
from headmaster.embedding.pipeline import EmbedResult, Skipped, prepare_image, progress_enabled, scan_paths
from headmaster.store import FileRecord, Model, Store

if TYPE_CHECKING:
    from headmaster.embedding.onnx.preprocess import PreprocessSpec

INSTALL_HINT = ("--engine ray needs Ray Data, which is not installed: pip install 'headmaster[ray]' "
                "(in a checkout: uv sync --extra ray)")
OK, CACHED, UNUSABLE, UNAVAILABLE = "ok", "cached", "unusable", "unavailable"
log = logging.getLogger("headmaster.ray")

# (vectors of the rows just embedded, N x dim) -> columns of N values each, computed on the actors beside the
# model (heads' numpy scoring, say); called on the driver for vectors that were already cached
Score = Callable[[np.ndarray], dict[str, np.ndarray]]


def require_ray() -> Any:
    """The ray module, or one line saying how to install it."""
    # Workers run this machine's (or their node's) installed headmaster: under `uv run`, Ray would otherwise
    # copy the working folder into every session and build a fresh virtual environment there for the workers.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise HeadmasterError(INSTALL_HINT) from None
    return ray


@dataclass
class RayOptions:
    address: str | None = None  # None: a private local Ray instance; "auto" or "HOST:6379" joins a cluster
    workers: int | None = None  # embedding actors; None: one per gpus_per_worker GPUs, else one per 4 CPUs
    gpus_per_worker: float = 0.0  # 0: CPU actors
    cpus_per_worker: float | None = None  # None: 1 with a GPU, else half the cluster's CPUs shared among actors
    batch_size: int | None = None  # images per forward pass; None: 64 on GPUs, 16 on CPUs
    backend: str | None = None  # auto, torch or onnxruntime, as for the local engine
    out: Path | None = None  # write Parquet vector files here instead of headmaster.db
    progress: bool | None = None  # Ray Data's progress bars; None: on a terminal only
    max_pixels: int | None = None  # the decoders' bomb limit ([embedding] max_pixels); None: images.MAX_IMAGE_PIXELS


@dataclass
class RayResult(EmbedResult):
    """EmbedResult, plus what only a cluster run has."""

    failed: int = 0  # files skipped with a reason (unreadable, not an image, vanished): len(skipped)
    actors: int = 0
    start_seconds: float = 0.0  # connecting to (or starting) Ray, checking the paths, loading the plan's model
    redelivered: int = 0  # rows Ray delivered twice after a retry (counted once)
    files: list[Path] = field(default_factory=list)  # Parquet files written (with RayOptions.out)
    scores: dict[Path, dict[str, Any]] = field(default_factory=dict)  # with `score`: path -> its columns

    @property
    def images_per_second(self) -> float:
        run = self.seconds - self.start_seconds
        return self.embedded / run if run > 0 else 0.0

    def summary(self, model_name: str) -> str:
        """One line: images, cached, failures, wall time and the rate."""
        where = f" into {len(self.files)} Parquet file{'s' if len(self.files) != 1 else ''}" if self.files else ""
        rate = (f", {self.images_per_second:.1f} img/s after {self.start_seconds:.1f}s of Ray start-up"
                if self.embedded else "")
        workers = f" ({self.actors} workers)" if self.actors else ""  # none when nothing needed embedding
        return (f"Embedded {self.embedded} images with {model_name} on Ray{workers}{where} "
                f"({self.cached} cached, {self.failed} failed) in {self.seconds:.1f}s{rate}")


# -- the plan ---------------------------------------------------------------------------------------------

@dataclass
class Work:
    """What the driver found before starting anything."""

    scan: Any  # pipeline.Scan
    todo: list[Path]  # files the pipeline reads: known contents without a vector (one path each), and new files
    known_todo: dict[Path, str]  # among `todo`, the files the index knows: path -> hash
    bad: dict[str, str]  # known contents that failed before: hash -> reason


def find_work(store: Store, model: Model, paths: list[Path]) -> Work:
    scan = scan_paths(store, paths, model.id)
    pending = {p: h for p, h in scan.known.items() if h not in scan.cached}
    bad = store.unusable(model.id, set(pending.values()), DECODER_VERSION)
    known_todo: dict[Path, str] = {}
    queued: set[str] = set()
    for p, h in pending.items():
        if h not in bad and h not in queued:
            queued.add(h)
            known_todo[p] = h
    return Work(scan, [*known_todo, *(p for p, _, _ in scan.to_read)], known_todo, bad)


@dataclass
class RayPlan:
    files: int
    cached: int  # known to the file index and cached
    to_embed: int  # known contents without a vector
    to_hash: int  # new or changed files: hashed on the workers, the cached ones among them skipped there
    unusable: int  # known contents that failed before (skipped, as the local engine does)
    vanished: int
    options: RayOptions

    def describe(self) -> str:
        o = self.options
        where = o.address or "a local Ray instance (ray.init())"
        per = (f"{o.gpus_per_worker:g} GPU" if o.gpus_per_worker else "CPU only") + \
            (f", {o.cpus_per_worker:g} CPUs" if o.cpus_per_worker else "")
        workers = f"{o.workers} embedding actors" if o.workers else \
            f"one embedding actor per {f'{o.gpus_per_worker:g} GPU' if o.gpus_per_worker else '4 CPUs'} of the cluster"
        lines = [f"Plan (dry run, nothing started): {self.files} files",
                 f"  cached:        {self.cached}",
                 f"  to embed:      {self.to_embed + self.to_hash} ({self.to_hash} new or changed files are hashed on "
                 f"the workers first; cached ones among them are skipped there)",
                 f"  skipped:       {self.unusable} known unusable, {self.vanished} vanished",
                 f"  cluster:       {where}",
                 f"  workers:       {workers}, each {per}; decode tasks 1 CPU each",
                 f"  batch size:    {o.batch_size or ('64' if o.gpus_per_worker else '16')}",
                 f"  writes to:     {o.out if o.out else 'headmaster.db'}"]
        return "\n".join(lines)


def plan_ray(store: Store, model: Model, paths: list[Path], options: RayOptions) -> RayPlan:
    """What `embed_paths_ray` would do, from the database and the file system alone: Ray is not imported."""
    paths = list(dict.fromkeys(Path(p) for p in paths))
    work = find_work(store, model, paths)
    return RayPlan(len(paths), len(work.scan.known) - len(work.known_todo) - sum(
        1 for h in work.scan.known.values() if h in work.bad) - _duplicates(work), len(work.known_todo),
        len(work.scan.to_read), sum(1 for h in work.scan.known.values() if h in work.bad), len(work.scan.skipped),
        options)


def _duplicates(work: Work) -> int:
    """Known files not queued because another file with the same content is."""
    pending = [h for h in work.scan.known.values() if h not in work.scan.cached and h not in work.bad]
    return len(pending) - len(set(pending))


# -- what runs on the workers -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Preprocessing:
    """The model's preprocessing, sent to the decode tasks: an ONNX export's spec, or the HF processor."""

    side: int  # decode no smaller than this
    spec: "PreprocessSpec | None" = None
    processor: Any = None

    def __call__(self, images: list) -> np.ndarray:
        if self.spec is not None:
            return self.spec.apply(images)
        from headmaster.embedding.embedders import processor_pixels

        return processor_pixels(self.processor, images)


def decode_batch(batch: dict[str, np.ndarray], prepare: Preprocessing, done: frozenset[str],
                 bad: dict[str, str], max_pixels: int | None = None) -> dict[str, np.ndarray]:
    """CPU task: each path -> its hash, status, reason and preprocessed pixels (float32 bytes, empty unless ok).

    Contents in `done` (cached) or `bad` (failed before) are not decoded. Never raises for one file.
    """
    paths, hashes, status, reasons, pixels = [], [], [], [], []
    for raw in batch["path"]:
        path = str(raw)
        digest, state, reason, px = "", OK, "", b""
        try:
            digest = file_sha256(path)
        except OSError as e:
            state, reason = UNAVAILABLE, f"cannot read ({e.strerror or e})"
        else:
            if digest in done:
                state = CACHED
            elif digest in bad:
                state, reason = UNUSABLE, bad[digest]
            else:
                prepared = prepare_image(path, prepare.side, prepare, max_pixels=max_pixels)
                if isinstance(prepared, ImageError):
                    state = UNAVAILABLE if isinstance(prepared, ImageUnavailable) else UNUSABLE
                    reason = str(prepared)
                else:
                    px = np.ascontiguousarray(prepared, dtype=np.float32).tobytes()
        paths.append(path)
        hashes.append(digest)
        status.append(state)
        reasons.append(reason)
        pixels.append(px)
    return {"path": np.array(paths, dtype=object), "hash": np.array(hashes, dtype=object),
            "status": np.array(status, dtype=object), "reason": np.array(reasons, dtype=object),
            "pixels": np.array(pixels, dtype=object)}


def actor_embedder(model: Model, backend: str, device: str | None, threads: int) -> Any:
    """backend_embedder, with the forward pass held to the actor's share of the node's cores."""
    embedder = backend_embedder(model, backend, device)
    if getattr(embedder, "backend", "torch") == "onnxruntime":
        from headmaster.embedding.onnx.runtime import cpu_session

        return dataclasses.replace(embedder, session=cpu_session(embedder.onnx_path, threads))
    if embedder.device.type == "cpu":
        import torch

        torch.set_num_threads(threads)
    return embedder


class EmbedActor:
    """One per actor: loads the model once, then turns each batch's pixels into vectors (and scores)."""

    def __init__(self, model: Model, backend: str, device: str | None, threads: int, shape: tuple[int, ...],
                 score: Score | None = None):
        self.embedder = actor_embedder(model, backend, device, threads)
        self.shape, self.score, self.dim = tuple(shape), score, model.embed_dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        status = batch["status"]
        ok = status == OK
        n = len(status)
        vectors = np.zeros((n, self.dim), np.float32)
        if ok.any():
            pixels = np.stack([np.frombuffer(b, np.float32).reshape(self.shape) for b in batch["pixels"][ok]])
            vectors[ok] = self.embedder.embed_pixels(pixels)
        out = {k: batch[k] for k in ("path", "hash", "status", "reason")}
        out["vector"] = vectors
        out["worker"] = np.full(n, os.getpid(), np.int64)  # which process embedded the row (logs, tests)
        if self.score is not None:
            for name, values in self.score(vectors[ok]).items():
                values = np.asarray(values)
                column = np.zeros((n, *values.shape[1:]), values.dtype) if values.dtype != object \
                    else np.full(n, "", dtype=object)
                column[ok] = values
                out[name] = column
        return out


# -- the driver -------------------------------------------------------------------------------------------

def connect(address: str | None) -> bool:
    """Join the cluster at `address`, or start a local instance; False when Ray was initialised already."""
    if address and address.startswith("ray://"):
        raise HeadmasterError("Ray Data does not run over Ray Client (ray://...): run hm on a node of the cluster "
                              "with --address auto (or HOST:6379), or submit it there as a Ray job")
    ray = require_ray()
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home from a batch job
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private instance: no token file in ~/.ray
    try:
        # "local": a private instance even where RAY_ADDRESS or `ray start` points at a cluster
        ray.init(address=address or "local", include_dashboard=False if address is None else None,
                 logging_level=logging.WARNING, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise HeadmasterError(f"cannot start or reach {where}: {first}") from None
    return True


def check_readable_on_workers(sample: Path) -> None:
    """One tiny task per alive node: is `sample` readable there at the same path? Else one line."""
    ray = require_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_retries=0)
    def probe(path: str) -> tuple[str, bool]:
        import socket

        return socket.gethostname(), os.path.isfile(path) and os.access(path, os.R_OK)

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(str(sample)) for n in nodes]
    for node, (host, readable) in zip(nodes, ray.get(refs, timeout=300)):
        if not readable:
            raise HeadmasterError(
                f"{sample} is not readable on Ray node {host} ({node.get('NodeManagerAddress', '?')}): every "
                f"worker must see the images at the same path as the driver (NFS or another shared mount)")


def cluster_shape(options: RayOptions) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) from the options and the cluster's resources."""
    ray = require_ray()
    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 1)), float(resources.get("GPU", 0))
    g = float(options.gpus_per_worker or 0)
    if g:
        if gpus < g:
            raise HeadmasterError(f"--gpus-per-worker {g:g} asked for, but the Ray cluster has {gpus:g} GPUs")
        actors = options.workers or max(1, int(gpus // g))
        per_cpu = options.cpus_per_worker or 1.0
    else:
        actors = options.workers or max(1, int(cpus // 4))
        per_cpu = options.cpus_per_worker or max(0.25, min(1.0, cpus / 2 / actors))
    return actors, per_cpu, g


def actor_memory(model: Model) -> int:
    """Bytes an embedding actor reserves: twice the model's files (weights, activations), at least 256 MiB."""
    total = 0
    root = Path(os.path.expanduser(model.path))
    if root.is_dir():
        for dirpath, _, names in os.walk(root):
            for name in names:
                try:
                    total += os.path.getsize(os.path.join(dirpath, name))
                except OSError:
                    pass
    return max(256 * 1024**2, 2 * total)


def driver_embedder(model: Model, options: RayOptions) -> tuple[Any, str]:
    """The model loaded once on the driver (a bad model fails here, in one line) and the backend the actors use."""
    backend = check_backend(options.backend)
    if options.gpus_per_worker:
        if backend == "onnxruntime":
            raise HeadmasterError("the onnxruntime backend runs on the CPU only; leave --gpus-per-worker out or "
                                  "use --backend torch")
        backend = "torch"
    embedder = backend_embedder(model, backend, "cpu")
    return embedder, getattr(embedder, "backend", "torch")


def preprocessing_of(embedder: Any) -> Preprocessing:
    spec = getattr(embedder, "spec", None)
    if spec is not None:
        return Preprocessing(embedder.input_side, spec=spec)
    return Preprocessing(embedder.input_side, processor=embedder.processor)


def embed_paths_ray(store: Store, model: Model, paths: list[Path], options: RayOptions | None = None, *,
                    score: Score | None = None, on_batch: Callable[[dict], None] | None = None) -> RayResult:
    """Make sure every readable image in `paths` has a vector for `model`, computed on a Ray cluster.

    The same outcome as pipeline.embed_paths: vectors in the cache under the model and content hash (or,
    with `options.out`, in Parquet files there and nothing written to the database), the file index
    updated, unusable contents remembered, `hashes` and `skipped` filled alike. Ray is started only when
    something needs embedding. `score`, when given, runs on the actors beside the model for every new
    vector and on the driver for cached ones: `scores` then holds its columns per usable path.
    `on_batch` sees every batch the driver receives (numpy columns), before it is written.
    Files are only read, never modified or removed.
    """
    options = options or RayOptions()
    started = time.perf_counter()
    paths = list(dict.fromkeys(Path(p) for p in paths))
    work = find_work(store, model, paths)
    scan = work.scan
    result = RayResult()
    result.skipped, result.hashed = list(scan.skipped), len(scan.to_read)
    hashes: dict[Path, str] = dict(scan.known)
    bad = dict(work.bad)
    vectors_written: set[str] = set()
    if work.todo:
        ray = require_ray()
        shut_down = connect(options.address)
        try:
            _run(ray, store, model, work, options, result, hashes, bad, vectors_written, score, on_batch, started)
        finally:
            if shut_down:
                ray.shutdown()
    result.cached += sum(1 for h in scan.known.values() if h in scan.cached)
    for p, h in list(hashes.items()):
        if h in bad:
            result.skipped.append(Skipped(p, bad[h]))
            del hashes[p]
    result.failed = len(result.skipped)
    result.hashes = {p: hashes[p] for p in paths if p in hashes}
    if score is not None and options.out is None:
        _score_cached(store, model, result, score)
    result.seconds = time.perf_counter() - started
    return result


def _run(ray: Any, store: Store, model: Model, work: Work, options: RayOptions, result: RayResult,
         hashes: dict[Path, str], bad: dict[str, str], vectors_written: set[str], score: Score | None,
         on_batch: Callable[[dict], None] | None, started: float) -> None:
    from ray.data import ActorPoolStrategy, DataContext

    check_readable_on_workers(work.todo[0])
    embedder, backend = driver_embedder(model, options)
    prepare = preprocessing_of(embedder)
    shape = tuple(prepare([_blank(prepare.side)]).shape[1:])
    actors, cpus, gpus = cluster_shape(options)
    batch_size = options.batch_size or (64 if gpus else 16)
    result.actors, result.batch_size, result.backend = actors, batch_size, backend
    # the workers skip contents already cached or failed before: only needed when there are unseen files
    done = frozenset(store.vector_hashes(model.id)) if work.scan.to_read else frozenset()
    known_bad = store.all_unusable(model.id, DECODER_VERSION) if work.scan.to_read else {}
    signatures = {p: (key, sig) for p, key, sig in work.scan.to_read}

    context = DataContext.get_current()
    context.enable_progress_bars = progress_enabled(options.progress)
    context.print_on_execution_start = False
    # without bars Ray Data's logger would say so, and that each execution finished: only its errors then
    logging.getLogger("ray.data").setLevel(logging.WARNING if context.enable_progress_bars else logging.ERROR)
    items = [{"path": str(p)} for p in work.todo]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), math.ceil(len(items) / batch_size))))
    ds = ds.map_batches(decode_batch, batch_size=batch_size, batch_format="numpy", num_cpus=1,
                        fn_kwargs={"prepare": prepare, "done": done, "bad": known_bad,
                                   "max_pixels": options.max_pixels})
    # Ray Data's actor pools restart a dead actor and retry its batch (max_restarts=-1, max_task_retries=-1 by
    # default). The memory the model needs is declared: it schedules actors where it fits, and keeps Ray Data
    # from fusing the decode tasks into the actors (which would decode and embed in turn on one core).
    ds = ds.map_batches(EmbedActor, batch_size=batch_size, batch_format="numpy",
                        compute=ActorPoolStrategy(size=actors), num_cpus=cpus, num_gpus=gpus or None,
                        memory=actor_memory(model),
                        fn_constructor_kwargs={"model": model, "backend": backend,
                                               "device": "cuda" if gpus else "cpu",
                                               "threads": max(1, int(round(cpus))), "shape": shape,
                                               "score": score})
    del embedder
    result.start_seconds = time.perf_counter() - started
    writer = None
    if options.out is not None:
        from headmaster.embedding.vector_files import VectorWriter

        writer = VectorWriter(options.out, model.name)
    seen: set[str] = set()
    found_bad: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    try:
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):  # blocks as they arrive
            if on_batch is not None:
                on_batch(batch)
            records, new_vectors = [], ([], [])
            for i, path_s in enumerate(batch["path"]):
                if path_s in seen:
                    result.redelivered += 1
                    continue
                seen.add(path_s)
                path, digest, state = Path(path_s), batch["hash"][i], batch["status"][i]
                reason = str(batch["reason"][i])
                if digest and path in signatures:
                    key, sig = signatures[path]
                    records.append(FileRecord(key, sig[0], sig[1], sig[2], digest))
                if state == UNAVAILABLE:
                    result.skipped.append(Skipped(path, reason))
                    hashes.pop(path, None)
                    continue
                hashes[path] = digest
                if state == CACHED:
                    result.cached += 1
                elif state == UNUSABLE:
                    if digest not in bad:
                        found_bad.append((digest, reason))
                    bad[digest] = reason
                elif state == OK:
                    if digest not in vectors_written:
                        vectors_written.add(digest)
                        new_vectors[0].append(digest)
                        new_vectors[1].append(batch["vector"][i])
                    if score is not None:
                        result.scores[path] = {k: batch[k][i] for k in batch if k not in _ROW_COLUMNS}
            if writer is not None:
                if new_vectors[0]:
                    writer.write(new_vectors[0], np.stack(new_vectors[1]))
            else:
                if new_vectors[0]:
                    store.put_vectors(model.id, zip(*new_vectors))
                if records:
                    store.put_file_records(records)
            result.embedded += len(new_vectors[0])
            if not result.first_batch_images and new_vectors[0]:
                result.first_batch_seconds = time.perf_counter() - t0
                result.first_batch_images = len(new_vectors[0])
    finally:
        if writer is not None:
            result.files = writer.close()
        elif found_bad:
            store.put_unusable(model.id, found_bad, DECODER_VERSION)
    result.embed_seconds = time.perf_counter() - t0


_ROW_COLUMNS = {"path", "hash", "status", "reason", "vector", "worker", "pixels"}


def _blank(side: int) -> Any:
    from PIL import Image

    return Image.new("RGB", (side, side))


def _score_cached(store: Store, model: Model, result: RayResult, score: Score) -> None:
    """Scores for usable paths that came from the cache (computed on the driver: numpy, no model)."""
    missing = {p: h for p, h in result.hashes.items() if p not in result.scores}
    if not missing:
        return
    found = store.vectors(model.id, set(missing.values()))
    ordered = [p for p in missing if missing[p] in found]
    if not ordered:
        return
    columns = score(np.stack([found[missing[p]] for p in ordered]))
    for i, p in enumerate(ordered):
        result.scores[p] = {k: v[i] for k, v in columns.items()}


def embed_for_ray(ctx: Any, model: Model, paths: list[Path], label: str = "Embedding",
                  options: RayOptions | None = None, **kwargs: Any) -> RayResult:
    """`embed_paths_ray` with the command's backend and progress from `ctx` (an embed_for stand-in)."""
    options = dataclasses.replace(options or RayOptions())
    if options.backend is None:
        options.backend = ctx.options.backend
    if options.progress is None:
        options.progress = ctx.options.progress
    if options.batch_size is None:
        options.batch_size = ctx.options.batch_size
    return embed_paths_ray(ctx.store, model, paths, options, **kwargs)
