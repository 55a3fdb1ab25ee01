"""`hm`: the command line. Each command parses, calls one library function, prints."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Callable

import click

from headmaster import checkpoints, registry, status as status_mod
from headmaster.context import Context, EmbedOptions
from headmaster.errors import HeadmasterError
from headmaster.evaluation import confusion_matrix, format_confusion
from headmaster.heads import TrainConfig
from headmaster.pipeline import Skipped
from headmaster.sorting import classify_folder
from headmaster.training import embed_heads, head_names, train_one


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
        except KeyboardInterrupt:
            _err("interrupted")
            sys.exit(130)

    return wrapper


def embed_options(fn: Callable) -> Callable:
    """--device, --batch-size, --workers: shared by every command that embeds."""
    fn = click.option("--workers", type=click.IntRange(min=1), default=None,
                      help="Decode threads (default: one per core, at most 8).")(fn)
    fn = click.option("--batch-size", type=click.IntRange(min=1), default=None,
                      help="Images per forward pass (default: 16 on CPU, 64 on GPU).")(fn)
    fn = click.option("--device", default=None, metavar="DEVICE",
                      help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu).")(fn)
    return fn


def _context(obj: dict, device=None, batch_size=None, workers=None) -> Context:
    return Context.open(obj.get("workspace"), EmbedOptions(device, batch_size, workers, obj.get("progress")))


def _print_skipped(skipped: list[Skipped], root: Path) -> None:
    for s in skipped:
        try:
            shown = s.path.relative_to(root)
        except ValueError:
            shown = s.path
        click.echo(f"Skipped {shown}: {s.reason}", err=True)


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
    every folder inside it a bucket (class). Register a model, embed, train,
    then classify new images.
    """
    ctx.obj = {"workspace": workspace, "progress": progress}


# -- models ---------------------------------------------------------------------

@cli.command("model-add")
@click.option("--name", required=True, help="Your alias for the model, e.g. clip-vit-l.")
@click.option("--path", "path", required=True, help="Hugging Face id (openai/clip-vit-large-patch14) or a local folder.")
@click.option("--dim", required=True, type=int, help="Embedding size the model produces, e.g. 768.")
@click.pass_obj
@user_errors
def model_add(obj, name: str, path: str, dim: int) -> None:
    """Register an embedding model."""
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
@embed_options
@click.pass_obj
@user_errors
def embed(obj, head, device, batch_size, workers) -> None:
    """Compute embeddings for all images with the active model (cached ones are skipped)."""
    with _context(obj, device, batch_size, workers) as c:
        report = embed_heads(c, head)
        _print_skipped(report.result.skipped, c.workspace.root)
        for conflict in report.conflicts:
            _warn("label conflict: " + conflict.describe(c.workspace.heads_dir))
        for w in report.warnings:
            _warn(w)
        for e in report.errors:
            _warn(e + " (train will refuse this head)")
        click.echo(report.result.summary(report.model.name)
                   + (f"; ignored {report.ignored} non-image or hidden files" if report.ignored else ""))


@cli.command()
@click.option("--head", default=None, help="Only this head (default: all heads).")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None,
              help="Binary heads: use this threshold instead of the F1-optimal one.")
@click.option("--epochs", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the split and the weights.")
@embed_options
@click.pass_obj
@user_errors
def train(obj, head, threshold, epochs, lr, seed, device, batch_size, workers) -> None:
    """Embed, then train heads and write out/<head>.pt."""
    config = TrainConfig(epochs=epochs, lr=lr, seed=seed, threshold=threshold)
    failed = 0
    with _context(obj, device, batch_size, workers) as c:
        names = head_names(c, head)
        for name in names:
            try:
                r = train_one(c, name, config)
            except HeadmasterError as e:
                if head is not None:
                    raise
                _err(str(e))
                failed += 1
                continue
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
            where = os.path.relpath(r.checkpoint_path) if not str(os.path.relpath(r.checkpoint_path)).startswith("..") \
                else str(r.checkpoint_path)
            click.echo(f"Trained {name} ({r.head_type}, {len(r.classes)} classes, {r.images} images: "
                       f"{r.train_count} train / {r.val_count} validation): {score} -> {where}")
    if failed:
        sys.exit(1)


# -- inspect ----------------------------------------------------------------------

@cli.command()
@click.option("--head", default=None, help="Show one head in detail.")
@click.pass_obj
@user_errors
def status(obj, head) -> None:
    """Show all heads, or one head in detail."""
    with _context(obj) as c:
        if head:
            click.echo(status_mod.format_status_detail(status_mod.head_status(c.workspace, head),
                                                       c.workspace.heads_dir))
            from headmaster.learning import correction_counts  # learning from corrections (daemon)

            learned = correction_counts(c.store, head)
            if learned["examples"]:
                click.echo(f"From corrections: {learned['examples']} examples "
                           f"({learned['corrections']} corrections, {learned['confirmed']} confirmed)")
        else:
            click.echo(status_mod.format_status_table(status_mod.all_status(c.workspace)))


@cli.command()
@click.option("--head", required=True, help="Trained head to use.")
@click.option("--src", required=True, type=click.Path(), help="Folder of images to classify (not recursive).")
@click.option("--dest", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: <workspace>/classified/<head>/).")
@embed_options
@click.pass_obj
@user_errors
def classify(obj, head, src, dest, device, batch_size, workers) -> None:
    """Copy images from SRC into bucket folders (and uncertain/) by a trained head."""
    with _context(obj, device, batch_size, workers) as c:
        report = classify_folder(c, head, Path(src), Path(dest) if dest else None)
        _print_skipped(report.skipped, Path(src))
        counts = report.counts()
        summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing"
        click.echo(f"Classified {len(report.decisions)} images into {report.dest}: {summary}"
                   + (f" ({len(report.skipped)} skipped)" if report.skipped else ""))


@cli.command("confusion-matrix")
@click.option("--head", required=True, help="Trained head to evaluate.")
@click.option("--test-dir", type=click.Path(), default=None,
              help="Labelled test folder (default: <workspace>/test/<head>/).")
@click.option("--extended", is_flag=True, help="List every image as [CORRECT] or [WRONG].")
@embed_options
@click.pass_obj
@user_errors
def confusion_matrix_cmd(obj, head, test_dir, extended, device, batch_size, workers) -> None:
    """Evaluate a trained head on a labelled test set."""
    with _context(obj, device, batch_size, workers) as c:
        result = confusion_matrix(c, head, Path(test_dir) if test_dir else None)
        _print_skipped(result.skipped, c.workspace.root)
        click.echo(format_confusion(result, extended, root=Path.cwd()))


# -- checkpoints ----------------------------------------------------------------

@cli.command()
@click.option("--dest", required=True, type=click.Path(), help="Folder to copy checkpoints into.")
@click.pass_obj
@user_errors
def export(obj, dest) -> None:
    """Copy all checkpoints to a folder."""
    with _context(obj) as c:
        copied = checkpoints.export_checkpoints(c.workspace, Path(dest))
    click.echo(f"Exported {len(copied)} checkpoint(s) to {dest}")


@cli.command()
@click.option("--head", default=None, help="Only this head's checkpoint.")
@click.pass_obj
@user_errors
def clean(obj, head) -> None:
    """Remove checkpoints (images and embeddings are kept)."""
    with _context(obj) as c:
        removed = checkpoints.clean_checkpoints(c.workspace, head)
    click.echo(f"Removed {len(removed)} checkpoint(s)" + "".join(f"\n  {p.name}" for p in removed))


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
    from headmaster.learning import unlearn as unlearn_file

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
    from headmaster.learning import corrections_log

    with _context(obj) as c:
        c.workspace.head(head)
        rows = corrections_log(c.store, head, limit)
        if not rows:
            click.echo(f"No corrections for {head} yet")
            return
        for r in rows:
            click.echo(f"{r.at}  {r.kind:<10}  {r.bucket:<12}  {os.path.relpath(r.source, c.workspace.root)}")


def main() -> None:
    cli(prog_name="hm")


if __name__ == "__main__":
    main()
