"""`hm`: the command line. Each command parses, calls one library function, prints."""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import click

from headmaster import HeadmasterError
from headmaster.config import BACKENDS
from headmaster.embedding import Context, EmbedOptions, registry
from headmaster.heads import FILE_FORMATS, FORMATS, checkpoint_files as checkpoints, write_rows
from headmaster.workspace import Workspace, shown_path

if TYPE_CHECKING:
    from headmaster.embedding import Skipped


class LazyModule:
    """A module imported on first attribute access."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)


def lazy(module: str, name: str) -> Callable:
    """A library function imported when first called: torch and transformers load only for commands
    that need them, so `hm --help`, `hm model-list` and the like answer at once."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = name
    return call


SIDECAR_KINDS = ("txt", "json")  # headmaster.curation.sidecars.KINDS, named here so the option needs no torch import
status_mod = LazyModule("headmaster.heads.status")
calibrate_head = lazy("headmaster.evaluation", "calibrate_head")
format_calibration = lazy("headmaster.evaluation", "format_calibration")
plot_calibration = lazy("headmaster.evaluation", "plot_calibration")
compare_models = lazy("headmaster.evaluation", "compare_models")
format_comparison = lazy("headmaster.evaluation", "format_comparison")
confusion_matrix = lazy("headmaster.evaluation", "confusion_matrix")
format_confusion = lazy("headmaster.evaluation", "format_confusion")
plot_confusion = lazy("headmaster.evaluation", "plot_confusion")
TrainConfig = lazy("headmaster.heads", "TrainConfig")
describe_goal = lazy("headmaster.heads", "describe_goal")
describe_selection = lazy("headmaster.heads", "describe_selection")
evaluate_head = lazy("headmaster.evaluation", "evaluate_head")
format_evaluation = lazy("headmaster.evaluation", "format_evaluation")
parse_kinds = lazy("headmaster.evaluation", "parse_kinds")
plot_evaluation = lazy("headmaster.evaluation", "plot_evaluation")
dupes_rows = lazy("headmaster.evaluation", "dupes_rows")
find_near_duplicates = lazy("headmaster.evaluation", "find_near_duplicates")
hashed_leaks = lazy("headmaster.evaluation", "hashed_leaks")
indexed_leaks = lazy("headmaster.evaluation", "indexed_leaks")
find_suspects = lazy("headmaster.curation", "find_suspects")
rank_folder = lazy("headmaster.curation", "rank_folder")
rank_rows = lazy("headmaster.curation", "rank_rows")
suspect_rows = lazy("headmaster.curation", "suspect_rows")
write_sidecars = lazy("headmaster.curation", "write_sidecars")
tag_library = lazy("headmaster.curation", "tag_library")
nearest_the_cut = lazy("headmaster.curation", "nearest_the_cut")
near_cut_rows = lazy("headmaster.curation", "near_cut_rows")
TagOptions = lazy("headmaster.curation", "TagOptions")
confusion_figures = lazy("headmaster.evaluation", "confusion_figures")
evaluation_figures = lazy("headmaster.evaluation", "evaluation_figures")
save_figures = lazy("headmaster.evaluation", "save_figures")
classify_folder = lazy("headmaster.heads", "classify_folder")
prediction_rows = lazy("headmaster.heads", "prediction_rows")
predict_heads = lazy("headmaster.heads", "predict_heads")
source_images = lazy("headmaster.heads", "source_images")
embed_heads = lazy("headmaster.heads", "embed_heads")
labelled_paths = lazy("headmaster.heads", "labelled_paths")
import_labels_fn = lazy("headmaster.curation", "import_labels")
read_label_csv = lazy("headmaster.curation", "read_label_csv")
train_one = lazy("headmaster.heads", "train_one")
export_onnx = lazy("headmaster.heads", "export_onnx")
FinetuneConfig = lazy("headmaster.finetune", "FinetuneConfig")
run_finetune = lazy("headmaster.finetune", "finetune")


def _err(message: str) -> None:
    click.echo(f"Error: {message}", err=True)


def _warn(message: str) -> None:
    click.echo(f"Warning: {message}", err=True)


def user_errors(fn: Callable) -> Callable:
    """Turn HeadmasterError into one line on stderr and exit status 1; never a traceback for user mistakes."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HeadmasterError as e:
            _err(str(e))
            sys.exit(1)
        except sqlite3.DatabaseError as e:  # headmaster.db damaged after it opened: still one line
            _err(f"database error: {e}; `hm doctor` checks the database")
            sys.exit(1)
        except KeyboardInterrupt:
            _err("interrupted")
            sys.exit(130)

    return wrapper


def embed_options(fn: Callable | None = None, *, bad_config_ok: bool = False) -> Callable:
    """--device, --batch-size, --workers, --backend: shared by every command that embeds.

    --backend is handed to `_context` through the click context's obj, so commands keep their signatures.
    `bad_config_ok`: a config file that does not load means the default backend (`hm doctor` reports it).
    """
    if fn is None:
        return functools.partial(embed_options, bad_config_ok=bad_config_ok)

    command = fn

    @functools.wraps(command)
    @user_errors  # a bad config file is one line, like every user error
    def with_backend(*args, backend=None, **kwargs):
        obj = click.get_current_context().find_root().obj
        try:
            embedding = _config_embedding(obj)
            obj["backend"], obj["max_pixels"] = backend or embedding.backend, embedding.max_pixels
        except HeadmasterError:
            if not bad_config_ok:
                raise
            obj["backend"], obj["max_pixels"] = "auto", None
        return command(*args, **kwargs)

    fn = click.option("--backend", type=click.Choice(BACKENDS), default=None,
                      help="Engine of the forward pass: auto (ONNX Runtime on a CPU when the model exports "
                           "cleanly, else PyTorch), torch or onnxruntime (default: [embedding] backend in "
                           "config.toml, else auto).")(with_backend)
    fn = click.option("--workers", type=click.IntRange(min=1), default=None,
                      help="Decode threads (default: one per core; at most 8 on CPU).")(fn)
    fn = click.option("--batch-size", type=click.IntRange(min=1), default=None,
                      help="Images per forward pass (default: 16 on CPU, 64 on GPU).")(fn)
    fn = click.option("--device", default=None, metavar="DEVICE",
                      help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu).")(fn)
    return fn


ENGINES = ("local", "ray")


def ray_options(fn: Callable) -> Callable:
    """--engine, --address, --gpus-per-worker: the Ray engine's options (headmaster.embedding.ray_engine)."""
    fn = click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=None,
                      help="With --engine ray: GPUs per embedding actor (default: CPU actors).")(fn)
    fn = click.option("--address", default=None, metavar="ADDR",
                      help="With --engine ray: the cluster to join from one of its nodes (auto, HOST:6379); "
                           "default: start a local Ray instance.")(fn)
    fn = click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
                      help="local: this machine's pipeline. ray: a Ray Data pipeline on a Ray cluster "
                           "(pip install 'headmaster[ray]'; images readable at the same path on every worker).")(fn)
    return fn


def _ray_options(obj: dict, engine: str, address, gpus_per_worker, workers, batch_size, out=None,
                 dry_run: bool = False):
    """RayOptions for --engine ray; the Ray-only flags refused (one line) with the local engine."""
    if engine != "ray":
        given = [name for name, value in (("--address", address), ("--gpus-per-worker", gpus_per_worker),
                                          ("--out", out), ("--dry-run", dry_run or None)) if value is not None]
        if given:
            raise HeadmasterError(f"{', '.join(given)} only apply to --engine ray")
        return None
    from headmaster.embedding import RayOptions

    return RayOptions(address=address, workers=workers, gpus_per_worker=gpus_per_worker or 0.0,
                      batch_size=batch_size, backend=obj.get("backend"), out=Path(out) if out else None,
                      progress=obj.get("progress"), max_pixels=obj.get("max_pixels"))


def _context(obj: dict, device=None, batch_size=None, workers=None) -> Context:
    return Context.open(obj.get("workspace"), EmbedOptions(device, batch_size, workers, obj.get("progress"),
                                                           obj.get("backend"), obj.get("max_pixels")),
                        notify=_note)


def _note(message: str) -> None:
    click.echo(message, err=True)


def _early_checks(obj: dict, existing: tuple[str, ...] = (), trained: tuple[str, ...] = ()) -> None:
    """Refuse an unknown or untrained head from the file system alone, before torch loads (well under a
    second instead of several); the library checks the same again."""
    ws = Workspace.from_env(obj.get("workspace"))
    for head in existing:
        ws.head(head)
    for head in trained:
        ws.trained_checkpoint(head)


def _config_embedding(obj: dict):
    """The config file's [embedding] section (backend, max_pixels), else the defaults."""
    from headmaster.config import load_config

    return load_config(workspace=obj.get("workspace")).embedding


def _print_skipped(skipped: list[Skipped], root: Path) -> None:
    for s in skipped:
        click.echo(f"Skipped {shown_path(s.path, root)}: {s.reason}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--workspace", "-w", type=click.Path(file_okay=False), default=None,
              help="Workspace folder (default: $HEADMASTER_WORKSPACE, else ./workspace).")
@click.option("--progress/--no-progress", default=None,
              help="Show progress bars (default: only when stderr is a terminal).")
@click.version_option(package_name="headmaster")
@click.pass_context
def cli(ctx: click.Context, workspace: str | None, progress: bool | None) -> None:
    """Train classifier heads on vision model embeddings.

    Folders are the configuration: every folder in workspace/heads/ is a head,
    every folder inside it a bucket (class). Embed, train, then classify new
    images. With no model registered, the built-in EfficientNet-Lite0 is
    registered as `default` on first use. New here? Run `hm demo`.
    """
    ctx.obj = {"workspace": workspace, "progress": progress}
    _library_warnings()


class _WarningLine(logging.Handler):
    """The library's warnings (e.g. why a model embeds with PyTorch, not ONNX Runtime) as `Warning: ...` lines."""

    def emit(self, record: logging.LogRecord) -> None:
        _warn(record.getMessage())


def _library_warnings() -> None:
    logger = logging.getLogger("headmaster")
    if not any(isinstance(h, _WarningLine) for h in logger.handlers):
        handler = _WarningLine(logging.WARNING)
        logger.addHandler(handler)


# -- first run ------------------------------------------------------------------

@cli.command()
@click.argument("directory", metavar="[DIR]", required=False, default="headmaster-demo",
                type=click.Path(file_okay=False))
@embed_options
@click.pass_obj
@user_errors
def demo(obj, directory: str, device, batch_size, workers) -> None:
    """Try the main job on sample photos, offline, in about a minute.

    Lays out a workspace in DIR (default ./headmaster-demo; new, empty but for
    a config.toml, or an earlier demo): a head of 4 clothing classes from real photos, and held-back
    photos of the same classes in DIR/unsorted/. Trains the head with the
    built-in backbone (unless DIR has another model registered), copies the
    held-back photos into DIR/classified/clothing/<class>/ or uncertain/, and
    reports how many went to their own class.
    """
    from headmaster.heads import lay_out, run_demo

    started = time.perf_counter()
    layout = lay_out(Path(directory))
    root = _shown(layout.root)
    shown_train = ", ".join(f"{k} {v}" for k, v in layout.train.items())
    click.echo(("Reusing the demo workspace " if layout.reused else "Laid out a demo workspace in ") + root
               + f": head clothing ({shown_train} photos), {len(layout.truth)} held-back photos in {root}/unsorted")
    options = EmbedOptions(device, batch_size, workers, obj.get("progress"), obj.get("backend"))
    with Context.open(str(layout.root), options, notify=_note) as c:
        report = run_demo(c, layout)
        _print_trained(report.train, c)
    _print_demo(report, root, time.perf_counter() - started)


def _print_demo(report, root: str, seconds: float) -> None:
    sorted_ = report.sorted
    counts = sorted_.counts()
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    verb = "Decided again (copies from the earlier run kept)" if sorted_.dry_run else "Sorted copies of"
    click.echo(f"{verb} {len(sorted_.decisions)} held-back photos into {_shown(sorted_.dest)}: {summary}")
    right, total = sum(report.correct.values()), sum(report.total.values())
    per_class = ", ".join(f"{c} {report.correct[c]}/{report.total[c]}" for c in report.total)
    click.echo(f"Accuracy on the held-back photos: {report.accuracy:.2f} ({right} of {total} in their own class: "
               f"{per_class})")
    for m in report.mistakes:
        click.echo(f"  {m.path.name}: a {m.truth}, went to {m.bucket}/ ({m.score:.2f})")
    click.echo(f"Done in {seconds:.0f}s.\n")
    steps = [
        (f"ls {root}/classified/clothing/*", "the sorted copies (unsorted/ keeps the originals)"),
        (f"uv run hm -w {root} status --head clothing", "the head, its buckets and scores"),
        (f"HEADMASTER_WORKSPACE={root} uv run hmd", f"the daemon: it sorts what lands in {root}/inbox/clothing/"),
        ("http://127.0.0.1:7878", f"the review page, while hmd runs (or `uv run hm -w {root} serve`)"),
        (f"mkdir -p {root}/heads/mine/{{yes,no}}", "your own head: 20+ photos in each bucket, then"),
        (f"uv run hm -w {root} train --head mine", ""),
    ]
    width = max(len(command) for command, _ in steps)
    click.echo("Next:")
    for command, why in steps:
        click.echo(f"  {command:<{width}}  {'# ' + why if why else ''}".rstrip())


# -- models ---------------------------------------------------------------------

@cli.command("model-add")
@click.option("--name", required=True, help="Your alias for the model, e.g. clip-vit-l.")
@click.option("--path", "path", required=True, help="Hugging Face id (openai/clip-vit-large-patch14) or a local folder.")
@click.option("--dim", type=int, default=None,
              help="Embedding size the model produces, e.g. 768 (default: learned by embedding one blank image; "
                   "when given, it is checked the same way).")
@click.pass_obj
@user_errors
def model_add(obj, name: str, path: str, dim: int | None) -> None:
    """Register an embedding model (loads it once to learn or check its vector size).

    Without any registered model, commands use the built-in EfficientNet-Lite0
    backbone, registered as `default` on first use.
    """
    with _context(obj) as c:
        model = registry.add_model(c.store, name, path, dim)
    click.echo(f"Added model {model.name} ({model.path}, dim {model.embed_dim})"
               + (" and activated it (first model)" if model.active else ""))


@cli.command("model-activate")
@click.option("--name", required=True, help="Registered model name.")
@click.pass_obj
@user_errors
def model_activate(obj, name: str) -> None:
    """Make a model the one used for embed, train and classify."""
    with _context(obj) as c:
        model = registry.activate_model(c.store, name)
    click.echo(f"Active model: {model.name}")


@cli.command("model-list")
@click.pass_obj
@user_errors
def model_list(obj) -> None:
    """Show registered models (* marks the active one)."""
    with _context(obj) as c:
        click.echo(registry.format_model_list(registry.list_models(c.store)))


@cli.command("model-remove")
@click.option("--name", required=True, help="Registered model name.")
@click.pass_obj
@user_errors
def model_remove(obj, name: str) -> None:
    """Remove a model and its cached embeddings."""
    with _context(obj) as c:
        n = registry.remove_model(c.store, name)
    click.echo(f"Removed model {name} and {n} cached embeddings")


# -- embed and train ------------------------------------------------------------

@cli.command()
@click.option("--head", default=None, help="Only this head (default: all heads).")
@ray_options
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="With --engine ray: write the vectors as Parquet files into this folder instead of "
                   "headmaster.db (bring them in later with `hm vectors import`).")
@click.option("--dry-run", is_flag=True,
              help="With --engine ray: print the plan (files to embed, cached, workers, resources); start nothing.")
@embed_options
@click.pass_obj
@user_errors
def embed(obj, head, engine, address, gpus_per_worker, out, dry_run, device, batch_size, workers) -> None:
    """Compute embeddings for all images with the active model (cached ones are skipped).

    With --engine ray, on a Ray cluster: --workers embedding actors (default: one per
    --gpus-per-worker GPUs, else one per 4 CPUs), the vectors back into the same cache.
    """
    ray = _ray_options(obj, engine, address, gpus_per_worker, workers, batch_size, out, dry_run)
    if ray is not None:
        return _embed_ray(obj, head, ray, dry_run, device)
    timings = os.environ.get("HEADMASTER_TIMINGS") == "1"  # for bench/embed.py: one JSON line on stderr
    if timings:
        importlib.import_module("headmaster.heads.training")  # imports are start-up, not the command's work
    started = time.perf_counter()
    with _context(obj, device, batch_size, workers) as c:
        c.workspace.heads_to_use(head)  # before torch loads
        report = embed_heads(c, head)
        _print_embed_problems(report, c.workspace)
        click.echo(report.result.summary(report.model.name)
                   + (f"; ignored {report.ignored} non-image or hidden files" if report.ignored else ""))
    if timings:
        numbers = dict(report.result.timings(), command_seconds=time.perf_counter() - started)
        click.echo("timings " + json.dumps(numbers), err=True)


def _print_embed_problems(report, ws: Workspace) -> None:
    """What `hm embed` says besides its summary, whichever engine embedded: skipped files, label conflicts,
    the heads' warnings and errors."""
    _print_skipped(report.result.skipped, ws.root)
    for conflict in report.conflicts:
        _warn("label conflict: " + conflict.describe(ws.heads_dir))
    for w in report.warnings:
        _warn(w)
    for e in report.errors:
        _warn(e + " (train will refuse this head)")


def _embed_ray(obj: dict, head: str | None, options, dry_run: bool, device) -> None:
    from headmaster.embedding import embed_for_ray, plan_ray, require_ray

    if device is not None:
        raise HeadmasterError("--device is for the local engine; with --engine ray use --gpus-per-worker")
    with _context(obj, None, options.batch_size) as c:
        c.workspace.heads_to_use(head)
        if dry_run:
            click.echo(plan_ray(c.store, c.active_model(), labelled_paths(c, head), options).describe())
            return
        require_ray()  # one line before any model loads
        engine = functools.partial(embed_for_ray, options=options)
        report = embed_heads(c, head, engine=engine)
        _print_embed_problems(report, c.workspace)
        click.echo(report.result.summary(report.model.name))
        if options.out is not None:
            click.echo(f"Wrote {len(report.result.files)} Parquet files to {options.out}; "
                       f"bring them into a workspace with: hm vectors import {options.out}", err=True)


@cli.group("vectors")
def vectors_group() -> None:
    """Cached vectors as Parquet files, to carry them between workspaces."""


@vectors_group.command("export")
@click.option("--model", "model_name", default=None, help="Registered model whose vectors to write (default: the active one).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write into (new or empty).")
@click.pass_obj
@user_errors
def vectors_export(obj, model_name, out) -> None:
    """Write the cache's vectors for a model as Parquet (content_hash, model, dim, vector)."""
    from headmaster.embedding import export_vectors

    with _context(obj) as c:
        report = export_vectors(c.store, model_name or c.store.active_model().name, Path(out))
        click.echo(f"Wrote {report.rows} vectors of {report.model.name} ({report.model.embed_dim}-d) into "
                   f"{len(report.files)} file{'s' if len(report.files) != 1 else ''} in {out}")


@vectors_group.command("import")
@click.argument("src", metavar="DIR", type=click.Path())
@click.pass_obj
@user_errors
def vectors_import(obj, src) -> None:
    """Merge Parquet vector files (from `hm vectors export` or `hm embed --engine ray --out`) into this cache.

    Refuses a file whose model is not registered here, or whose vectors have another size.
    """
    from headmaster.embedding import describe_import, import_vectors

    with _context(obj) as c:
        click.echo(describe_import(import_vectors(c.store, Path(src), notify=_note)))


@cli.command()
@click.option("--head", default=None, help="Only this head (default: all heads).")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None,
              help="Binary heads: use this threshold instead of the F1-optimal one.")
@click.option("--epochs", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the split and the weights.")
@click.option("--kind", type=click.Choice(["mlp", "linear", "prototype", "auto"]), default=None,
              help="mlp: the seed's trained MLP. linear: one linear layer on the same inputs (a logistic "
                   "regression started from the class prototypes). prototype: one mean vector per class, cosine "
                   "similarity, no training (--epochs and --lr do not apply). auto: each kind scored on the same "
                   "repeated out-of-fold splits as `hm evaluate`, the simplest within one standard error of the best "
                   "trained on all images. Default: the kind of the head's current checkpoint, else mlp.")
@click.option("--max-error", type=click.FloatRange(0, 1, max_open=True), default=None,
              metavar="E", help="Choose the uncertain cut from out-of-fold scores so that, of the images the head "
                                "decides, at most this share is wrong (the one-sided 95% Clopper-Pearson bound, "
                                "tested cut by cut from the strictest; binary: a band around the threshold, "
                                "multi-class: a minimum confidence). What it cannot decide goes to uncertain/; "
                                "when no cut reaches the goal the head sorts nothing. The goal stays with the head: "
                                "later retrains (hm train, hmd) keep it. 0 drops it.")
@embed_options
@click.pass_obj
@user_errors
def train(obj, head, threshold, epochs, lr, seed, kind, max_error, device, batch_size, workers) -> None:
    """Embed, then train heads and write out/<head>.pt."""
    failed = 0
    with _context(obj, device, batch_size, workers) as c:
        names = c.workspace.heads_to_use(head)
        for name in names:
            try:
                c.workspace.head(name).check()  # a bad head is refused before torch loads
                config = TrainConfig(epochs=epochs, lr=lr, seed=seed, threshold=threshold, kind=kind,
                                     max_error=max_error)
                r = train_one(c, name, config)
            except HeadmasterError as e:
                if head is not None:
                    raise
                _err(str(e))
                failed += 1
                continue
            _print_trained(r, c)
    if failed:
        sys.exit(1)


def _print_trained(r, c: Context) -> None:
    """The warnings and the one summary line of a trained head (hm train, hm demo)."""
    _print_skipped(r.skipped, c.workspace.root)
    for conflict in r.conflicts:
        _warn("label conflict: " + conflict.describe(c.workspace.heads_dir))
    for w in r.warnings:
        _warn(w)
    m = r.metrics
    if r.head_type == "binary":
        score = f"accuracy {m['accuracy']:.2f}, F1 {m['f1']:.2f}, threshold {r.threshold:.2f}"
    else:
        macro = sum(v["f1"] for v in m["per_class"].values()) / len(m["per_class"])
        score = f"accuracy {m['accuracy']:.2f}, macro F1 {macro:.2f}"
    shown_type = r.head_type + (f" {r.kind}" if r.kind != "mlp" else "")
    click.echo(f"Trained {r.head} ({shown_type}, {len(r.classes)} classes, {r.images} images: "
               f"{r.train_count} train / {r.val_count} validation): {score} -> {_shown(r.checkpoint_path)}")
    if r.selection:
        click.echo("  " + describe_selection(r.selection))
    if r.error_goal:
        click.echo("  " + describe_goal(r.error_goal))


@cli.command()
@click.option("--heads", required=True, metavar="A,B,C", help="Heads to fine-tune the backbone for (comma separated).")
@click.option("--name", default=None, help="Name of the new model (default: <active model>-ft-<heads>).")
@click.option("--rank", type=click.IntRange(min=1), default=8, show_default=True, help="LoRA rank.")
@click.option("--lp-epochs", type=click.IntRange(min=1), default=50, show_default=True,
              help="Stage 1: head epochs on frozen vectors (also used to retrain the heads after).")
@click.option("--ft-epochs", type=click.IntRange(min=1), default=None,
              help="Stage 2: epochs of adapters and heads together (default: 6 on CPU, 10 on GPU).")
@click.option("--blocks", type=click.IntRange(min=1), default=None,
              help="Adapt the last N blocks of the backbone (default: 2 on CPU, a third of them, at least 2, on GPU).")
@click.option("--views", type=click.IntRange(min=0), default=None,
              help="Augmented views per training image, computed once (default: 4 on CPU, 8 on GPU).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="Learning rate of the adapters (the heads use a tenth of it).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the split and the weights (augmented views depend on the image only).")
@click.option("--memory-gb", type=click.FloatRange(min=0, min_open=True), default=4.0, show_default=True,
              help="Memory for the cached activations of the frozen blocks (fewer augmented views when they would not fit).")
@click.option("--activate", is_flag=True, help="Activate the new model even if it does not beat the frozen heads.")
@embed_options
@click.pass_obj
@user_errors
def finetune(obj, heads, name, rank, lp_epochs, ft_epochs, blocks, views, lr, seed, memory_gb, activate, device,
             batch_size, workers) -> None:
    """Fine-tune the active model for some heads (LP-FT with LoRA) and register it as a new model.

    Stage 1 trains the heads on the frozen model (as hm train). Stage 2 adds LoRA
    adapters to the backbone's last blocks and trains them with the heads on the
    heads' training images (random crops, flips), keeping the epoch with the best
    validation accuracy. The adapters go to <workspace>/models/NAME/, registered as
    model NAME. If it beats the frozen heads, NAME becomes the active model and the
    heads are retrained on its vectors; unless those beat the frozen heads too, the
    base and its heads come back (--activate keeps NAME anyway). Ctrl-C stops after
    the current step and keeps the best epoch so far.
    """
    names = [h.strip() for h in heads.split(",") if h.strip()]
    config = FinetuneConfig(rank=rank, alpha=2.0 * rank, lp_epochs=lp_epochs, ft_epochs=ft_epochs, blocks=blocks,
                            views=views, lr=lr, head_lr=lr / 10, batch_size=batch_size or 32, seed=seed,
                            memory_gb=memory_gb)
    with _context(obj, device, None, workers) as c:
        r = run_finetune(c, names, name, config, activate, say=click.echo)
        click.echo(f"Fine-tuned {r.base.name} for {', '.join(names)}: {r.train_images} training images, "
                   f"{r.val_images} validation; trunk pass {r.trunk_seconds:.0f}s, fine-tuning {r.ft_seconds:.0f}s")
        click.echo(f"Validation accuracy: frozen {r.frozen_accuracy:.3f} -> fine-tuned {r.best_accuracy:.3f} "
                   f"(best epoch {r.best_epoch})")
        click.echo(f"Wrote {r.folder} and registered it as model {r.name}")
        if r.reverted:
            _warn(f"the heads retrained on {r.name}'s vectors score {r.reverted[1]:.3f} on validation, not above the "
                  f"frozen heads' {r.reverted[0]:.3f}; {r.base.name} and its heads stay active (use it anyway: "
                  f"hm model-activate --name {r.name}, then hm train)")
        elif not r.improved:
            _warn("the fine-tuned model does not beat the frozen heads on validation"
                  + ("; activated anyway (--activate)" if r.activated else
                     f"; {r.base.name} stays active (use it anyway: hm model-activate --name {r.name})"))
        if r.activated:
            click.echo(f"Active model: {r.name}; retrained on its vectors: "
                       + ", ".join(f"{t.head} accuracy {t.metrics['accuracy']:.3f}" for t in r.retrained))
            others = [h for h in c.workspace.head_names() if h not in names and c.workspace.checkpoint_path(h).exists()]
            if others:
                _warn(f"heads {', '.join(others)} were trained on {r.base.name}: retrain them (hm train) "
                      f"or activate {r.base.name} again to use them")


# -- inspect ----------------------------------------------------------------------

@cli.command()
@click.option("--head", default=None, help="Show one head in detail.")
@click.pass_obj
@user_errors
def status(obj, head) -> None:
    """Show all heads, or one head in detail."""
    with _context(obj) as c:
        if head:
            detail = status_mod.head_status(c.workspace, head)
            click.echo(status_mod.format_status_detail(detail, c.workspace.heads_dir))
            leaks, unknown = indexed_leaks(c.workspace, c.store, head, detail.labelled)  # file index only
            for leak in leaks:
                click.echo(f"Warning: {leak.describe(c.workspace.root)}")
            if unknown:
                click.echo(f"Leak check: {unknown} image(s) not hashed yet, not checked (`hm embed --head {head}` "
                           f"hashes heads/, `hm confusion-matrix --head {head}` test/ too)")
            from headmaster.curation import correction_counts  # learning from corrections (daemon)

            learned = correction_counts(c.store, head)
            if learned["examples"]:
                click.echo(f"From corrections: {learned['examples']} examples "
                           f"({learned['corrections']} corrections, {learned['confirmed']} confirmed)")
        else:
            click.echo(status_mod.format_status_table(status_mod.all_status(c.workspace)))


@cli.command()
@click.option("--head", default=None, help="Trained head to use.")
@click.option("--heads", default=None, metavar="A,B,C",
              help="Several trained heads (comma separated), scored from one vector per image: writes rows "
                   "(or sidecars), never copies.")
@click.option("--src", required=True, type=click.Path(), help="Folder of images to classify (not recursive).")
@click.option("--dest", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: <workspace>/classified/<head>/).")
@click.option("--format", "fmt", type=click.Choice(FORMATS + FILE_FORMATS), default=None,
              help="Write one row per image with every head's probabilities and prediction instead of copying "
                   "(default with --heads: csv; parquet needs --output).")
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="Write the rows to this file instead of stdout.")
@click.option("--sidecar", type=click.Choice(SIDECAR_KINDS), default=None,
              help="Write name.txt (predicted classes) or name.json (all scores) beside each image instead of copying.")
@click.option("--overwrite", is_flag=True, help="Replace existing sidecars or an existing --output file.")
@click.option("--tta", is_flag=True,
              help="Average each image's vector with its mirror image's (mirrored vectors are cached too).")
@click.option("--dry-run", is_flag=True, help="Print every copy or sidecar that would be made; change no file.")
@ray_options
@embed_options
@click.pass_obj
@user_errors
def classify(obj, head, heads, src, dest, fmt, output, sidecar, overwrite, tta, dry_run, engine, address,
             gpus_per_worker, device, batch_size, workers) -> None:
    """Copy images from SRC into bucket folders (and uncertain/) by a trained head.

    With --heads, --format or --output: print one row per image with each head's
    scores instead. With --sidecar: write the prediction beside each image instead.
    With --engine ray: rows only, computed on a Ray cluster, with the full path and
    the content hash added; nothing is copied or moved.
    """
    names = _head_list(head, heads)
    _early_checks(obj, trained=tuple(names))
    ray = _ray_options(obj, engine, address, gpus_per_worker, workers, batch_size)
    if ray is not None:
        if sidecar or dest or tta or dry_run or device:
            raise HeadmasterError("--engine ray writes rows only (--format, --output); it takes no "
                                  "--sidecar, --dest, --tta, --dry-run or --device")
        return _classify_ray(obj, names, Path(src), fmt or "csv", output, overwrite, ray)
    if fmt == "parquet" and output is None:
        raise HeadmasterError("--format parquet writes a file: give --output FILE")
    rows_mode = heads is not None or fmt is not None or output is not None
    if sidecar and (fmt or output):
        raise HeadmasterError("--sidecar writes files beside the images; it cannot be combined with --format/--output")
    if dest and (rows_mode or sidecar):
        raise HeadmasterError("--dest is only for copying with --head; rows and sidecars copy nothing")
    if overwrite and not (sidecar or output):
        raise HeadmasterError("--overwrite only applies to --sidecar or --output")
    with _context(obj, device, batch_size, workers) as c:
        if sidecar:
            _classify_sidecars(c, names, Path(src), sidecar, overwrite, dry_run, tta)
        elif rows_mode:
            _classify_rows(c, names, Path(src), fmt or "csv", output, overwrite, dry_run, tta)
        else:
            _classify_copy(c, names[0], Path(src), Path(dest) if dest else None, dry_run, tta)


def _head_list(head: str | None, heads: str | None) -> list[str]:
    if (head is None) == (heads is None):
        raise HeadmasterError("give either --head H or --heads A,B,C")
    if head is not None:
        return [head]
    names = [h.strip() for h in heads.split(",") if h.strip()]
    if not names:
        raise HeadmasterError("--heads needs at least one head name")
    return names


def _shown(path: Path, root: Path | None = None) -> str:
    """A path as the user typed it: relative to the working directory when below it."""
    try:
        return os.path.relpath(path) if not os.path.relpath(path).startswith("..") else str(path)
    except ValueError:
        return str(path)


def _classify_copy(c: Context, head: str, src: Path, dest: Path | None, dry_run: bool, tta: bool) -> None:
    report = classify_folder(c, head, src, dest, dry_run=dry_run, tta=tta)
    if os.environ.get("HEADMASTER_TIMINGS") == "1":  # for bench/daemon_vs_classify.py: one JSON line on stderr
        click.echo("timings " + json.dumps(report.embed.timings()), err=True)
    _print_skipped(report.skipped, src)
    if dry_run:
        for d, target in report.placed:
            p = d.probabilities.get(d.bucket, d.score)  # the decided bucket's own probability reads best
            click.echo(f"would copy {_shown(d.path)} -> {_shown(target)} ({d.bucket}, {p:.2f})")
    counts = report.counts()
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing"
    click.echo(("Dry run: would classify" if dry_run else "Classified")
               + f" {len(report.decisions)} images into {report.dest}: {summary}"
               + (f" ({len(report.skipped)} skipped)" if report.skipped else "")
               + ("; nothing was copied" if dry_run else ""))


def _classify_rows(c: Context, names: list[str], src: Path, fmt: str, output: str | None, overwrite: bool,
                   dry_run: bool, tta: bool) -> None:
    report = predict_heads(c, names, source_images(src), tta)
    _print_skipped(report.skipped, src)
    rows = prediction_rows(report)
    if output is None:
        write_rows(rows, fmt, sys.stdout)
    elif dry_run:
        exists = Path(output).exists()
        if exists and not overwrite:
            raise HeadmasterError(f"{output} already exists (use --overwrite to replace it)")
        click.echo(f"would {'replace' if exists else 'write'} {output} ({len(rows)} rows, {fmt})")
    else:
        write_rows(rows, fmt, path=Path(output), overwrite=overwrite)
        click.echo(f"Wrote {len(rows)} rows ({', '.join(names)}) to {output}", err=True)


def _classify_ray(obj: dict, names: list[str], src: Path, fmt: str, output: str | None, overwrite: bool,
                  options) -> None:
    from headmaster.embedding import require_ray
    from headmaster.heads import full_prediction_rows, predict_heads_ray

    if fmt == "parquet" and output is None:
        raise HeadmasterError("--format parquet writes a file: give --output FILE")
    if output is not None and Path(output).exists() and not overwrite:
        raise HeadmasterError(f"{output} already exists (use --overwrite to replace it)")
    require_ray()
    with _context(obj, None, options.batch_size) as c:
        report = predict_heads_ray(c, names, source_images(src), options)
        _print_skipped(report.skipped, src)
        rows = full_prediction_rows(report)
        if output is None:
            write_rows(rows, fmt, sys.stdout)
        else:
            write_rows(rows, fmt, path=Path(output), overwrite=overwrite)
            click.echo(f"Wrote {len(rows)} rows ({', '.join(names)}) to {output}", err=True)
        click.echo(report.embed.summary(report.model.name), err=True)


def _classify_sidecars(c: Context, names: list[str], src: Path, kind: str, overwrite: bool, dry_run: bool,
                       tta: bool) -> None:
    report = write_sidecars(c, names, src, kind, overwrite, dry_run, tta)
    _print_skipped(report.skipped, src)
    for a in report.actions:
        if dry_run or a.what == "kept":
            note = " (exists; --overwrite replaces it)" if a.what == "kept" else ""
            click.echo(f"{'would keep' if a.what == 'kept' and dry_run else a.what} {_shown(a.sidecar)}{note}")
    counts = report.counts()
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no images"
    click.echo(("Dry run: " if dry_run else "") + f"{kind} sidecars for {len(report.actions)} images in {src}: "
               + summary + (f" ({len(report.skipped)} skipped)" if report.skipped else ""))


@cli.command()
@click.argument("sources", metavar="SRC...", nargs=-1, required=True, type=click.Path())
@click.option("--heads", default=None, metavar="A,B,C", help="Heads to tag with (comma separated).")
@click.option("--all", "all_heads", is_flag=True, help="Every trained head (the default).")
@click.option("--recursive/--no-recursive", "-r", default=True, show_default=True,
              help="Walk folders below SRC (hidden files and folders are skipped, symlinks not followed).")
@click.option("--xmp/--no-xmp", default=True, show_default=True,
              help="Merge the tags into photo.jpg.xmp (dc:subject, lr:hierarchicalSubject, digiKam:TagsList); "
                   "everything else in it is kept.")
@click.option("--xmp-name", type=click.Choice(["full", "base"]), default="full", show_default=True,
              help="full: photo.jpg.xmp (digiKam, darktable, Immich); base: photo.xmp (Lightroom).")
@click.option("--txt", is_flag=True, help="Also write photo.txt captions (the tags, comma separated).")
@click.option("--json", "json_", is_flag=True, help="Also write photo.json (every head's decision and scores).")
@click.option("--threshold", "thresholds", multiple=True, metavar="T|HEAD=T",
              help="This run's cut: T for every binary head (tag when the positive bucket's probability is at "
                   "least T), HEAD=T for one head (a multi-class head's minimum confidence). Repeatable.")
@click.option("--prefix", default="", metavar="TEXT", help="Start every .txt caption with TEXT (not repeated).")
@click.option("--dry-run", is_flag=True, help="Print what would change; write nothing.")
@click.option("--uncertain", is_flag=True, help="List the photos nearest the cut instead (a ranking); write nothing.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="With --uncertain: how many photos.")
@embed_options
@click.pass_obj
@user_errors
def tag(obj, sources, heads, all_heads, recursive, xmp, xmp_name, txt, json_, thresholds, prefix, dry_run,
        uncertain, limit, device, batch_size, workers) -> None:
    """Tag the photos in SRC (files or folders) where they live: sidecars photo tools read.

    Each trained head's decision becomes a tag: a binary head's name when its positive
    bucket wins, a multi-class head's bucket (headmaster|<head>|<bucket>); uncertain adds
    nothing. The photos themselves are never written.
    """
    if heads is not None and all_heads:
        raise HeadmasterError("give --heads A,B or --all, not both")
    names = _head_list(None, heads) if heads is not None else None
    if names:
        _early_checks(obj, trained=tuple(names))
    options = TagOptions(xmp=xmp, txt=txt, json=json_, xmp_name=xmp_name, recursive=recursive,
                         cuts=_parse_cuts(thresholds), prefix=prefix, dry_run=dry_run)
    paths = [Path(s) for s in sources]
    with _context(obj, device, batch_size, workers) as c:
        if uncertain:
            near, skipped = nearest_the_cut(c, paths, names, options, limit)
            _print_skipped(skipped, Path.cwd())
            write_rows(near_cut_rows(near, Path.cwd()), "table", sys.stdout)
            return
        report = tag_library(c, paths, names, options)
    _print_tagged(report)


def _parse_cuts(values: tuple[str, ...]) -> dict:
    cuts: dict = {}
    for value in values:
        head, _, number = value.rpartition("=")
        try:
            cut = float(number)
        except ValueError:
            cut = -1.0
        if not 0 <= cut <= 1 or (head == "" and "=" in value):
            raise HeadmasterError(f"--threshold takes T or HEAD=T with T from 0 to 1, got '{value}'")
        cuts[head or None] = cut
    return cuts


def _print_tagged(report) -> None:
    here = Path.cwd()
    _print_skipped(report.skipped, here)
    for a in report.problems():
        click.echo(f"{_shown(a.sidecar)}: {a.note}", err=True)
    if report.dry_run:
        for a in report.actions:
            if a.what.startswith("would"):
                change = " ".join([*(f"+{t}" for t in a.added), *(f"-{t}" for t in a.removed)])
                click.echo(f"{a.what} {_shown(a.sidecar)}" + (f": {change}" if change else ""))
    kinds = "; ".join(f"{kind} " + ", ".join(f"{n} {what}" for what, n in sorted(counts.items()))
                      for kind, counts in report.counts().items()) or "no sidecars"
    tags = ", ".join(f"{t.removeprefix('headmaster|')} {n}" for t, n in sorted(report.tag_counts().items()))
    notes = [f"{len(report.skipped)} skipped"] if report.skipped else []
    if report.found.hidden:
        notes.append(f"{report.found.hidden} hidden skipped")
    if report.found.symlinks:
        notes.append(f"{report.found.symlinks} symlinks not followed")
    click.echo(("Dry run: would tag" if report.dry_run else "Tagged") + f" {len(report.tags)} images "
               f"({', '.join(report.heads)}) in {report.seconds:.1f} s, {report.images_per_second:.1f} img/s: "
               f"{kinds}; tags: {tags or 'none'}" + (f" ({', '.join(notes)})" if notes else "")
               + ("; nothing was written" if report.dry_run else ""))


@cli.command("confusion-matrix")
@click.option("--head", required=True, help="Trained head to evaluate.")
@click.option("--test-dir", type=click.Path(), default=None,
              help="Labelled test folder (default: <workspace>/test/<head>/).")
@click.option("--extended", is_flag=True, help="List every image as [CORRECT] or [WRONG].")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Also draw the matrix as a PNG here.")
@embed_options
@click.pass_obj
@user_errors
def confusion_matrix_cmd(obj, head, test_dir, extended, plot, device, batch_size, workers) -> None:
    """Evaluate a trained head on a labelled test set."""
    _early_checks(obj, trained=(head,))
    with _context(obj, device, batch_size, workers) as c:
        result = confusion_matrix(c, head, Path(test_dir) if test_dir else None)
        _print_skipped(result.skipped, c.workspace.root)
        click.echo(format_confusion(result, extended, root=Path.cwd()))
        save_figures(c.workspace, head, confusion=confusion_figures(result, c.workspace.root))  # for the page
        if plot:
            plot_confusion(result, Path(plot))
            click.echo(f"Wrote {plot}")
        if (c.workspace.heads_dir / head).is_dir():
            for leak in hashed_leaks(c, head, Path(test_dir) if test_dir else None):
                _warn(leak.describe(c.workspace.root))


# -- checkpoints ----------------------------------------------------------------

@cli.command()
@click.option("--dest", required=True, type=click.Path(), help="Folder to write into (created if needed).")
@click.option("--format", "fmt", type=click.Choice(["checkpoints", "onnx"]), default="checkpoints",
              show_default=True,
              help="checkpoints: copy the .pt files. onnx: one classifier.onnx (backbone and heads, runs with "
                   "onnxruntime alone) and classifier.json (preprocessing, classes, thresholds).")
@click.option("--heads", default=None, metavar="A,B,C",
              help="onnx: the heads to include (default: every head trained with the active model).")
@click.option("--check", is_flag=True,
              help="onnx: run the file on a few images of each head and compare with headmaster's scores.")
@click.pass_obj
@user_errors
def export(obj, dest, fmt, heads, check) -> None:
    """Copy all checkpoints to a folder, or export a standalone ONNX classifier (--format onnx)."""
    if fmt != "onnx":
        if heads or check:
            raise HeadmasterError("--heads and --check apply to --format onnx")
        with _context(obj) as c:
            copied = checkpoints.export_checkpoints(c.workspace, Path(dest))
        click.echo(f"Exported {len(copied)} checkpoint(s) to {dest}")
        return
    names = _head_list(None, heads) if heads is not None else None
    with _context(obj, device="cpu", batch_size=None, workers=None) as c:
        report = export_onnx(c, Path(dest), names, check)
    for head in report.skipped_heads:
        _warn(f"head '{head}' left out: trained with another model than the active '{report.model.name}'")
    for chk in report.checks:
        click.echo(f"Checked {chk.head}: {chk.images} images, largest probability difference {chk.max_diff:.1e}")
    click.echo(f"Exported {', '.join(report.heads)} with {report.model.name} to {_shown(report.onnx_path)} "
               f"({report.size_bytes / 1e6:.1f} MB) and {_shown(report.json_path)} in {report.seconds:.1f}s")


@cli.command()
@click.option("--head", default=None, help="Only this head's checkpoint.")
@click.pass_obj
@user_errors
def clean(obj, head) -> None:
    """Remove checkpoints (images and embeddings are kept)."""
    with _context(obj) as c:
        removed = checkpoints.clean_checkpoints(c.workspace, head)
    click.echo(f"Removed {len(removed)} checkpoint(s)" + "".join(f"\n  {p.name}" for p in removed))

# -- evaluation -------------------------------------------------------------------

@cli.command()
@click.option("--head", required=True, help="Head to evaluate (its images in heads/<head>/).")
@click.option("--repeats", type=click.IntRange(min=2), default=20, show_default=True,
              help="Random stratified splits to average over.")
@click.option("--test-size", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Share of each class held out for testing in every split.")
@click.option("--kind", type=click.Choice(["mlp", "prototype", "logreg", "all"]), default="all", show_default=True,
              help="Which head kind(s) to measure; logreg is a plain logistic-regression baseline.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the first split (then seed+1, ...).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write the cumulative accuracy function as a PNG here.")
@embed_options
@click.pass_obj
@user_errors
def evaluate(obj, head, repeats, test_size, kind, seed, plot, device, batch_size, workers) -> None:
    """Mean test accuracy with a 95% interval over repeated random splits of a head's images."""
    _early_checks(obj, existing=(head,))
    with _context(obj, device, batch_size, workers) as c:
        ev = evaluate_head(c, head, parse_kinds(kind), repeats, test_size, seed)
        _print_skipped(ev.skipped, c.workspace.root)
        click.echo(format_evaluation(ev))
        save_figures(c.workspace, head, evaluate=evaluation_figures(ev))  # the review page shows them
        if plot:
            plot_evaluation(ev, Path(plot))
            click.echo(f"Wrote {plot}")

@cli.command()
@click.option("--head", required=True, help="Trained head to calibrate.")
@click.option("--target-precision", type=click.FloatRange(0, 1), default=None,
              help="Binary: the threshold with the most recall whose out-of-fold precision reaches this.")
@click.option("--target-recall", type=click.FloatRange(0, 1), default=None,
              help="Binary: the threshold with the most precision whose out-of-fold recall reaches this.")
@click.option("--f1", "best_f1", is_flag=True, help="Binary: the threshold with the best out-of-fold F1.")
@click.option("--min-confidence", type=click.FloatRange(0, 1), default=None,
              help="Multi-class: store this cut (top probability below it goes to uncertain/).")
@click.option("--repeats", type=click.IntRange(min=2), default=10, show_default=True,
              help="Random stratified splits whose test scores are pooled.")
@click.option("--test-size", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Share of each class held out in every split.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the first split (then seed+1, ...).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write the precision/recall curve (binary) or the confidence-cut curve as a PNG here.")
@embed_options
@click.pass_obj
@user_errors
def calibrate(obj, head, target_precision, target_recall, best_f1, min_confidence, repeats, test_size, seed, plot,
              device, batch_size, workers) -> None:
    """Show the threshold trade-off from out-of-fold scores; store a chosen threshold or cut in the checkpoint."""
    _early_checks(obj, trained=(head,))
    with _context(obj, device, batch_size, workers) as c:
        cal = calibrate_head(c, head, target_precision, target_recall, best_f1, min_confidence, repeats, test_size,
                             seed)
        click.echo(format_calibration(cal))
        if plot:
            plot_calibration(cal, Path(plot))
            click.echo(f"Wrote {plot}")

@cli.command("compare-models")
@click.option("--head", required=True, help="Head whose images decide.")
@click.option("--models", default=None, metavar="A,B,C", help="Registered models to compare (default: all).")
@click.option("--kind", type=click.Choice(["mlp", "prototype", "logreg"]), default="mlp", show_default=True,
              help="Head kind measured on every model's vectors.")
@click.option("--repeats", type=click.IntRange(min=2), default=10, show_default=True,
              help="Random stratified splits per model.")
@click.option("--test-size", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Share of each class held out in every split.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the first split (then seed+1, ...).")
@embed_options
@click.pass_obj
@user_errors
def compare_models_cmd(obj, head, models, kind, repeats, test_size, seed, device, batch_size, workers) -> None:
    """Embed the head with every registered model and rank them: accuracy ± interval, ms/image, size."""
    names = [n.strip() for n in models.split(",") if n.strip()] if models else None
    _early_checks(obj, existing=(head,))
    with _context(obj, device, batch_size, workers) as c:
        result = compare_models(c, head, names, kind, repeats, test_size, seed)
        _print_skipped(result.skipped, c.workspace.root)
        click.echo(format_comparison(result))


# -- workflows: ranking, suspects, duplicates, CSV labels ----------------------------

def format_option(fn: Callable) -> Callable:
    return click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
                        help="Output as an aligned table, CSV or JSON.")(fn)


@cli.command()
@click.option("--head", required=True, help="Trained head to rank by.")
@click.option("--src", required=True, type=click.Path(), help="Folder of images to rank (not recursive).")
@click.option("--bucket", default=None,
              help="Rank by this bucket's probability (default: 'positive', else a binary head's scored class, "
                   "else the first class).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Show only the first N images.")
@click.option("--reverse", is_flag=True, help="Least likely first.")
@click.option("--tta", is_flag=True, help="Average each image's vector with its mirror image's.")
@format_option
@embed_options
@click.pass_obj
@user_errors
def rank(obj, head, src, bucket, limit, reverse, tta, fmt, device, batch_size, workers) -> None:
    """List the images of SRC by the probability of one bucket, most likely first (copies nothing)."""
    _early_checks(obj, trained=(head,))
    with _context(obj, device, batch_size, workers) as c:
        report = rank_folder(c, head, Path(src), bucket, limit, reverse, tta)
        _print_skipped(report.skipped, Path(src))
        if not report.ranked and fmt == "table":
            click.echo(f"No images to rank in {src}")
            return
        write_rows(rank_rows(report), fmt, sys.stdout)


@cli.command()
@click.option("--head", required=True, help="Head whose training images to check.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Show the N most suspect.")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="Train this many heads, each scoring the images it did not see.")
@click.option("--epochs", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the folds and the weights.")
@format_option
@embed_options
@click.pass_obj
@user_errors
def suspects(obj, head, limit, folds, epochs, seed, fmt, device, batch_size, workers) -> None:
    """List training images that their own bucket fits worst: likely label errors.

    Every image is scored by a head trained without it (out-of-fold); the
    lowest probability for the image's own bucket comes first, with the bucket
    that head prefers. The head's checkpoint is not changed.
    """
    _early_checks(obj, existing=(head,))
    with _context(obj, device, batch_size, workers) as c:
        report = find_suspects(c, head, folds, TrainConfig(epochs=epochs, seed=seed), limit)
        _print_skipped(report.skipped, c.workspace.root)
        for w in report.warnings:
            _warn(w)
        write_rows(suspect_rows(report, c.workspace.heads_dir), fmt, sys.stdout)


@cli.command()
@click.option("--head", required=True, help="Head whose images (heads/H and test/H) to compare.")
@click.option("--threshold", type=click.FloatRange(-1, 1), default=0.98, show_default=True,
              help="Cosine similarity from which two images count as near-duplicates.")
@click.option("--same-bucket", is_flag=True, help="Also list pairs inside one bucket.")
@click.option("--test-dir", type=click.Path(), default=None,
              help="Labelled test folder (default: <workspace>/test/<head>/ when it exists).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Show only the N most similar pairs.")
@format_option
@embed_options
@click.pass_obj
@user_errors
def dupes(obj, head, threshold, same_bucket, test_dir, limit, fmt, device, batch_size, workers) -> None:
    """List near-duplicate image pairs across buckets and across heads/ and test/."""
    with _context(obj, device, batch_size, workers) as c:
        report = find_near_duplicates(c, head, threshold, same_bucket, Path(test_dir) if test_dir else None, limit)
        _print_skipped(report.skipped, c.workspace.root)
        if not report.pairs and fmt == "table":
            click.echo(f"No pairs at or above {threshold} among {report.images} images")
            return
        write_rows(dupes_rows(report, c.workspace.root), fmt, sys.stdout)


@cli.command("import-labels")
@click.argument("csv_file", metavar="LABELS.CSV", type=click.Path(dir_okay=False))
@click.option("--images", required=True, type=click.Path(file_okay=False),
              help="Folder the first column's file names are relative to.")
@click.option("--link/--copy", "link", default=True, show_default=True,
              help="Hard-link the images into heads/ (a copy where links are impossible), or copy them.")
@click.option("--dry-run", is_flag=True, help="Print every link or copy that would be made; change no file.")
@click.option("--skip-bad-rows", is_flag=True,
              help="Import the good rows even if some rows are bad (a bad row still imports nothing).")
@click.pass_obj
@user_errors
def import_labels(obj, csv_file, images, link, dry_run, skip_bad_rows) -> None:
    """Make heads from a CSV: first column an image file, every other column a head, each value a bucket.

    The whole file is checked first. Any bad row (unknown image, wrong number
    of cells, impossible name) is reported with its line number and nothing is
    imported, unless --skip-bad-rows. Empty cells are skipped; an image already
    in its bucket is left as it is, so running twice adds nothing.
    """
    ws = Workspace.from_env(obj.get("workspace"))
    plan = read_label_csv(Path(csv_file), Path(images))
    for problem in plan.problems:  # all of them first, so one run shows everything to fix
        if skip_bad_rows:
            _warn(f"{csv_file} {problem} (row skipped)")
        else:
            _err(f"{csv_file} {problem}")
    report = import_labels_fn(plan, ws.heads_dir, "link" if link else "copy", dry_run, skip_bad_rows)
    if dry_run:
        for p in report.placed:
            click.echo(f"{p.how} {_shown(p.action.source)} -> {_shown(p.target)}")
    counts = report.counts()
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "nothing to do"
    heads_used = sorted({p.action.head for p in report.placed})
    click.echo(("Dry run: " if dry_run else "") + f"{len(report.placed)} labels from {plan.rows} rows into "
               f"{len(heads_used)} heads ({', '.join(heads_used) or '-'}): {summary}"
               + (f"; {len(plan.bad_lines)} bad rows skipped" if plan.problems else "")
               + ("; nothing was changed" if dry_run else ""))


# -- our own files ----------------------------------------------------------------

@cli.command()
@click.option("--rebuild-cache", is_flag=True,
              help="If the database is damaged: rename it aside (kept), start a new one, copy the model registry "
                   "over where it is still readable and embed every labelled image again.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="The daemon config to check (default: $HEADMASTER_CONFIG, else <workspace>/config.toml).")
@embed_options(bad_config_ok=True)
@click.pass_obj
@user_errors
def doctor(obj, rebuild_cache, config_path, device, batch_size, workers) -> None:
    """Check the database, the checkpoints in out/ and the config; change nothing unless asked.

    Exits with status 1 when something is damaged. Stop hmd before --rebuild-cache.
    """
    from headmaster.curation import doctor as doctor_mod

    ws = Workspace.from_env(obj.get("workspace"))
    findings = doctor_mod.diagnose(ws, config_path)
    for f in findings:
        click.echo(f"{'ok' if f.ok else 'DAMAGED':<8} {f.what}: {f.detail}")
    database_ok = findings[0].ok
    if rebuild_cache and not database_ok:
        report = doctor_mod.rebuild_cache(ws, options=EmbedOptions(device, batch_size, workers, obj.get("progress")))
        for path in report.moved_aside:
            click.echo(f"Kept the damaged file as {shown_path(path, ws.root)}")
        if report.lost_models:
            _warn(f"the model registry could not be read from the damaged file ({report.lost_models}); "
                  f"register your model again with `hm model-add`, then run `hm embed`")
        carried = []
        for table, s in report.history.items():
            lost = "an unknown number lost" if s.lost is None else f"{s.lost} lost"
            carried.append(f"{len(s.rows)} {table} row(s) recovered, {lost}")
            if s.lost != 0:
                _warn(f"{table}: some rows could not be read from the damaged file ({s.error})")
        click.echo(f"History carried over from the damaged file: {'; '.join(carried)}")
        click.echo(f"New database {shown_path(ws.db_path, ws.root)}: {len(report.models)} model(s) registered, "
                   f"{report.embedded} image(s) embedded")
        database_ok = True
    elif not database_ok:
        click.echo("Run `hm doctor --rebuild-cache` to set the damaged database aside and rebuild the cache "
                   "from the images (nothing is deleted).")
    if not database_ok or not all(f.ok for f in findings[1:]):
        damaged = [f.what for f in findings[1:] if not f.ok]
        if damaged:
            click.echo(f"Damaged: {', '.join(damaged)} (a checkpoint is rebuilt by `hm train --head HEAD`; "
                       f"a config is fixed by editing it)")
        sys.exit(1)


# -- daemon config ----------------------------------------------------------------

@cli.group("config")
def config_group() -> None:
    """The daemon's config file (config.toml)."""


@config_group.command("init")
@click.option("--path", "path", type=click.Path(dir_okay=False), default=None,
              help="Where to write it (default: <workspace>/config.toml).")
@click.pass_obj
@user_errors
def config_init_cmd(obj, path) -> None:
    """Write a starting config with every key at its default (never overwrites)."""
    from headmaster.config import CONFIG_NAME, config_init
    from headmaster.workspace import Workspace

    target = Path(path) if path else Workspace.from_env(obj.get("workspace")).root / CONFIG_NAME
    written = config_init(target, obj.get("workspace"))
    click.echo(f"Wrote {written}")


# -- learning from corrections ------------------------------------------------------

@cli.command()
@click.option("--head", required=True, help="The head that learned the example.")
@click.argument("file", type=click.Path(dir_okay=False))
@click.pass_obj
@user_errors
def unlearn(obj, head: str, file: str) -> None:
    """Remove the example a correction added for FILE (the corrected file or the example itself)."""
    from headmaster.curation import unlearn as unlearn_file

    with _context(obj) as c:
        c.workspace.head(head)
        example = unlearn_file(c.store, c.workspace, head, Path(file))
    click.echo(f"Unlearned {example.relative_to(c.workspace.heads_dir)} (retrain to apply; hmd does it by itself)")


@cli.command()
@click.option("--head", required=True, help="Head whose corrections to list.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.pass_obj
@user_errors
def corrections(obj, head: str, limit: int) -> None:
    """List the examples a head learned from corrections (newest first)."""
    from headmaster.curation import corrections_log

    with _context(obj) as c:
        c.workspace.head(head)
        rows = corrections_log(c.store, head, limit)
        if not rows:
            click.echo(f"No corrections for {head} yet")
            return
        for r in rows:
            click.echo(f"{r.at}  {r.kind:<10}  {r.bucket:<12}  {os.path.relpath(r.source, c.workspace.root)}")


# -- the review page without the daemon ---------------------------------------------

@cli.command()
@click.option("--listen", default=None, metavar="HOST:PORT",
              help="Address to serve on (default: [web] listen from the config, else 127.0.0.1:7878).")
@click.option("--token", default=None, envvar="HEADMASTER_WEB_TOKEN",
              help="Require this token on every request (needed for any non-loopback address).")
@click.pass_obj
@user_errors
def serve(obj, listen: str | None, token: str | None) -> None:
    """Serve the review page (hmd serves the same page by itself).

    Label uncertain images and fix suspects in the browser; each label is recorded
    as an example, as moving the file by hand is, and the head learns from it on
    the next `hm train`. The config's [[library]] folders get a queue of their
    photos nearest each head's cut (photos `hm tag` has scored); a label copies the
    photo in as an example and leaves it where it is. Stop with Ctrl-C.
    """
    from headmaster.config import check_listen, load_config

    config = load_config(None, obj.get("workspace"))
    web = config.web
    listen, token = listen or web.listen, web.token if token is None else token
    try:
        check_listen(listen, token)  # before the slow imports: a refusal is immediate
    except ValueError as e:
        raise HeadmasterError(f"--listen: {e}") from None
    ws = Workspace.from_env(obj.get("workspace"))
    if not ws.heads_dir.is_dir():
        raise HeadmasterError(f"no heads/ folder in {ws.root}; make a head first (mkdir -p heads/NAME/BUCKET)")
    from headmaster.daemon import LocalWorker
    from headmaster.web import ReviewService, WebError, WebServer

    models = LocalWorker(ws, EmbedOptions(progress=False))  # the model work on a thread of our own
    service = ReviewService(ws, models.call, libraries=config.library)  # [[library]]: their queues on the page
    try:
        server = WebServer(service, listen, token)
    except WebError as e:
        service.close()
        models.close()
        raise HeadmasterError(str(e)) from None
    click.echo(f"Review page: {server.url}  (workspace {ws.root}; Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass  # Ctrl-C is how one stops a server: not an error
    finally:
        service.close()
        models.close()
    click.echo("Stopped")


def main() -> None:
    cli(prog_name="hm")


if __name__ == "__main__":
    main()
