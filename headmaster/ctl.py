"""`hmctl`: talk to a running hmd over its control socket.

Every command is one request line and one answer line (see headmaster/daemon/control.py);
this module only parses options, sends and prints.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from headmaster import HeadmasterError
from headmaster.config import CONFIG_NAME, config_init, load_config
from headmaster.daemon import request


def _fail(message: str) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(1)


def _socket(obj: dict) -> Path:
    if obj.get("socket"):
        return Path(obj["socket"]).expanduser()
    return load_config(obj.get("config")).socket_path


def _call(obj: dict, cmd: str, **args: Any) -> Any:
    try:
        return request(_socket(obj), cmd, **args)
    except HeadmasterError as e:
        _fail(str(e))


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _score(metrics: dict) -> str:
    if "f1" in metrics:
        return f"{metrics['f1']:.2f}"
    per_class = metrics.get("per_class")
    if per_class:
        return f"{sum(v['f1'] for v in per_class.values()) / len(per_class):.2f}"
    return "—"


def format_status(s: dict[str, Any]) -> str:
    """The readable form of `hmctl status`."""
    paused = ", sorting PAUSED" if s.get("paused") else ""
    memory = f", {s['rss_mib']:.0f} MiB" if s.get("rss_mib") is not None else ""
    lines = [f"hmd pid {s['pid']}{memory}, up {_duration(s['uptime_s'])}, model {s.get('model') or '(none)'}, "
             f"{s.get('activity', '')}{paused}",
             f"Workspace: {s['workspace']}"]
    web = s.get("web")
    if web:
        lines.append(f"Review page: {web['url']}" if "url" in web else f"Review page: not served ({web['error']})")
    if "worker" in s:
        lines.append(format_worker(s["worker"]))
    for what, problem in (s.get("problems") or {}).items():
        lines.append(f"PROBLEM: {what}: {problem}")
    if s.get("reload_error"):
        lines.append(f"PROBLEM: the last reload failed, hmd runs on the old config: {s['reload_error']}")
    watchdog = s.get("watchdog")
    if watchdog:
        lines.append("Watchdog: pinging systemd" if watchdog["pinging"]
                     else f"Watchdog: NOT pinging systemd: {watchdog['why_not']}")
    inbox = s["inbox"]
    lines.append(f"Inbox: {inbox['path']}: {inbox['queued']} queued, {inbox['sorted']} sorted, "
                 f"{inbox['rejected']} rejected since start")
    for lib in s.get("libraries") or []:
        paused = ", PAUSED: path missing" if lib["paused"] else ""
        lines.append(f"Library: {lib['path']}: {lib['photos']} photos, {lib['tagged']} tagged, {lib['pending']} "
                     f"pending, {lib['failed']} failed{paused}")
    heads = s.get("heads", {})
    if not heads:
        lines.append("No heads yet.")
        return "\n".join(lines)
    table = [("HEAD", "TYPE", "IMAGES", "TRAINED", "F1", "RETRAINS", "NEXT RETRAIN", "WAITING")]
    for name, h in heads.items():
        trained = (h.get("last_trained") or "yes")[:19].replace("T", " ") if h["trained"] else "no"
        if h.get("training"):
            nxt = "training now"
        elif h.get("next_retrain"):
            nxt = h["next_retrain"][11:19]
        else:
            nxt = "pending" if h.get("pending_retrain") else "—"
        table.append((name, h["type"], str(h["images"]), trained, _score(h.get("metrics", {})),
                      str(h["retrains"]), nxt, str(h.get("waiting", 0))))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines.append("")
    lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)
    for name, h in heads.items():
        if h.get("examples_from_corrections"):
            lines.append(f"{name}: {h['examples_from_corrections']} example(s) learned from corrections "
                         f"({h.get('corrections', 0)} since start)")
        if h.get("error"):
            lines.append(f"{name}: {h['error']}")
        for key in ("selection", "sorts"):  # --kind auto's choice, --max-error's promise
            if h.get(key):
                lines.append(f"{name}: {h[key]}")
    return "\n".join(lines)


def format_worker(w: dict[str, Any]) -> str:
    """One line on the worker process: is the model loaded, since when, how much memory."""
    crashes = f"; {w['crashes']} crash(es), last: {w['last_crash']}" if w.get("crashes") else ""
    if not w.get("running"):
        return f"Worker: not running, model not loaded (starts with the next work){crashes}"
    memory = f", {w['rss_mib']:.0f} MiB" if w.get("rss_mib") is not None else ""
    model = (f"model loaded since {w['model_loaded_since'][11:19]}" if w.get("model_loaded")
             else "model not loaded yet")
    busy = f", busy: {w['busy']}" if w.get("busy") else ", idle"
    stays = "stays loaded" if not w.get("idle_seconds") else f"exits after {_duration(w['idle_seconds'])} idle"
    return f"Worker: pid {w['pid']}{memory}, up since {(w.get('since') or '')[11:19]}, {model}{busy}, {stays}{crashes}"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
              help="hmd's config file, to find its socket (default: the same lookup as hmd).")
@click.option("--socket", "socket_path", type=click.Path(), default=None, help="Talk to the daemon on this socket.")
@click.version_option(package_name="headmaster")
@click.pass_context
def hmctl(ctx: click.Context, config: str | None, socket_path: str | None) -> None:
    """Control a running hmd: status, retrain, rescan, pause/resume sorting, reload its config."""
    ctx.obj = {"config": config, "socket": socket_path}


@hmctl.command()
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
@click.pass_obj
def status(obj, as_json: bool) -> None:
    """Show the daemon, its heads and the inbox."""
    result = _call(obj, "status")
    click.echo(json.dumps(result, indent=2) if as_json else format_status(result))


@hmctl.command()
@click.argument("head", required=False)
@click.pass_obj
def retrain(obj, head: str | None) -> None:
    """Retrain HEAD (default: every head) now, even if nothing changed."""
    result = _call(obj, "retrain", **({"head": head} if head else {}))
    click.echo(f"Retrain queued: {', '.join(result['queued']) or 'no heads'}")


@hmctl.command()
@click.pass_obj
def rescan(obj) -> None:
    """Re-check heads/ and the inbox against the file index (after changes hmd could not see)."""
    _call(obj, "rescan")
    click.echo("Rescan queued")


@hmctl.command()
@click.pass_obj
def pause(obj) -> None:
    """Stop sorting the inbox (files wait; training goes on)."""
    _call(obj, "pause")
    click.echo("Sorting paused")


@hmctl.command()
@click.pass_obj
def resume(obj) -> None:
    """Sort the inbox again, starting with what waited."""
    _call(obj, "resume")
    click.echo("Sorting resumed")


@hmctl.command()
@click.pass_obj
def reload(obj) -> None:
    """Re-read the daemon's config file (same as SIGHUP)."""
    result = _call(obj, "reload")
    click.echo(f"Reloaded {result.get('config') or 'defaults'}")
    if result.get("restart_needed"):
        click.echo(f"Restart hmd to apply: {', '.join(result['restart_needed'])}")


@hmctl.command()
@click.argument("head")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Show at most this many.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def uncertain(obj, head: str, limit: int | None, as_json: bool) -> None:
    """List HEAD's uncertain files, most informative first (closest to the decision boundary).

    Move a file into classified/HEAD/BUCKET/ and hmd learns from it.
    """
    result = _call(obj, "uncertain", head=head, **({"limit": limit} if limit else {}))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    if not result:
        click.echo(f"No uncertain files for {head}")
        return
    click.echo(f"{'MARGIN':>6}  {'GUESS':<12}  FILE")
    for r in result:
        click.echo(f"{r['margin']:>6.3f}  {r['guess']:<12}  {r['path']}")


@hmctl.command()
@click.argument("head")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="Out-of-fold heads to train.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Show at most this many.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def suspects(obj, head: str, folds: int, limit: int, as_json: bool) -> None:
    """List HEAD's labelled examples the head doubts most (as `hm suspects`, answered by the running hmd)."""
    result = _call(obj, "suspects", head=head, folds=folds, limit=limit, timeout=600.0)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for w in result["warnings"]:
        click.echo(f"Warning: {w}", err=True)
    if not result["suspects"]:
        click.echo(f"No suspects for {head}")
        return
    click.echo(f"{'P(BUCKET)':>9}  {'BUCKET':<12}  {'PREFERS':<12}  FILE")
    for r in result["suspects"]:
        click.echo(f"{r['p_bucket']:>9.3f}  {r['bucket']:<12}  {r['preferred']:<12}  {r['path']}")


@hmctl.group("config")
def config_group() -> None:
    """The config file."""


@config_group.command("init")
@click.option("--path", "path", type=click.Path(dir_okay=False), default=None,
              help="Where to write it (default: --config, else <workspace>/config.toml).")
@click.pass_obj
def config_init_cmd(obj, path: str | None) -> None:
    """Write a starting config with every key at its default (never overwrites)."""
    try:
        target = Path(path or obj.get("config") or load_config().workspace_root / CONFIG_NAME)
        written = config_init(target)
    except HeadmasterError as e:
        _fail(str(e))
    click.echo(f"Wrote {written}")


def main() -> None:
    hmctl(prog_name="hmctl")


if __name__ == "__main__":
    main()
