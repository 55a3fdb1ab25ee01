"""hmd against `hm classify` on the same new photos, cold, in paired interleaved runs; and where hmd's time goes.

    uv run python bench/daemon_vs_classify.py [--shared ../shared] [--photos 372] [--per-class 10] [--pairs 3]
                                              [--work DIR] [--daemon-keys 'settle_seconds = 0.5'] [--backend torch]
                                              [--compare ../other-checkout]

Builds a workspace with one head, `clothing`, trained by `hm train` on the first --per-class photos of
each class of <shared>/data/clothing/train, with <shared>/models/efficientnet-lite0 registered; the
--photos others (bench/daemon_footprint.py's choice) are the drop. Then --pairs pairs, the order
alternating (classify first in odd pairs, hmd first in even ones), each run in its own fresh copy of
the trained workspace, so the drop's photos have no vectors and no file-index rows (cold cache):
  classify: `hm classify --head clothing --src DIR` on a folder holding the photos, wall time of the
            process (start-up, model load and the copies included; HEADMASTER_TIMINGS=1 for its numbers);
  hmd:      hmd started with its defaults (settle_seconds 2.0, max_batch_images 256, the worker not running,
            log_level DEBUG) plus --daemon-keys; once it is idle the photos are copied into
            inbox/clothing/ at once; wall time from the start of that copy until every photo is in
            classified/clothing/. hmd's log then gives the breakdown (timestamps of its own lines):
            settle wait, worker start, model load, each decide request, moves, gaps between requests.
Medians over the pairs, and the median of the per-pair ratios. Prints `uptime` before and after:
the machine may be shared. --work keeps the trained workspace (and each pair's hmd log) for another
invocation. --backend is given to both (`hm classify --backend`, hmd's `[embedding] backend`).
--compare DIR runs a second hmd in every round from another checkout (e.g. `git worktree add DIR <commit>`),
on the same interpreter and packages: before and after a change, under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from daemon_burst import stop_hmd  # bench/ is on sys.path when this script runs
from daemon_footprint import count_files, photos, run

from headmaster.daemon import request

HM = [sys.executable, "-m", "headmaster.cli"]
LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) (\w+)\s+(.*)$")
CALL = re.compile(r"worker decide (\d+) file\(s\) in ([\d.]+)s: model load ([\d.]+)s, decode\+forward ([\d.]+)s "
                  r"of (\d+) new, embed_paths ([\d.]+)s \((\d+) hashed\)")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def stage(base: Path, ws: Path) -> None:
    """A fresh copy of the trained workspace at `ws`, the path it was trained at: headmaster.db and out/ copied,
    the examples hard-linked (same path, size, mtime and inode), so hmd's start-up finds every example in the
    file index and cache and has no reason to start its worker."""
    shutil.rmtree(ws, ignore_errors=True)
    shutil.copytree(base, ws, copy_function=lambda src, dst: os.link(src, dst) if "/heads/" in src
                    else shutil.copy2(src, dst))


def build(work: Path, shared: Path, per_class: int, n: int, env: dict) -> tuple[Path, Path]:
    """(the trained workspace, a folder holding the drop's photos); reused when `work` has them.
    The head is trained in work/ws, then kept as work/base; every run gets a stage()d work/ws."""
    base, drop, ws = work / "base", work / "drop", work / "ws"
    if (base / "out" / "clothing.pt").is_file() and drop.is_dir() and len(list(drop.iterdir())) == n:
        print(f"reusing the trained workspace in {work}")
        return base, drop
    for old in (base, drop, ws):
        shutil.rmtree(old, ignore_errors=True)
    base = ws  # trained where the runs will be, then moved aside
    examples, pool = photos(shared, per_class, n)
    for c, files in examples.items():
        (base / "heads" / "clothing" / c).mkdir(parents=True)
        for f in files:
            shutil.copy(f, base / "heads" / "clothing" / c / f.name)
    run([*HM, "-w", str(base), "model-add", "--name", "lite0", "--path",
         str(shared / "models" / "efficientnet-lite0"), "--dim", "1280"], env=env)
    t = time.perf_counter()
    run([*HM, "-w", str(base), "train", "--head", "clothing"], env=env)
    print(f"hm train on {sum(map(len, examples.values()))} examples: {time.perf_counter() - t:.1f}s")
    drop.mkdir()
    for f in pool[:n]:
        shutil.copy(f, drop / f.name)
    os.rename(ws, work / "base")
    return work / "base", drop


def run_classify(base: Path, drop: Path, root: Path, env: dict, backend: str | None) -> dict:
    ws, src = base.parent / "ws", root / "src"
    stage(base, ws)
    shutil.copytree(drop, src)
    t = time.perf_counter()
    before = os.times()
    out = run([*HM, "-w", str(ws), "classify", "--head", "clothing", "--src", str(src),
               *(["--backend", backend] if backend else [])], env=dict(env, HEADMASTER_TIMINGS="1"))
    wall = time.perf_counter() - t
    after = os.times()
    cpu = after.children_user + after.children_system - before.children_user - before.children_system
    timings = next((json.loads(ln[8:]) for ln in out.stderr.splitlines() if ln.startswith("timings ")), {})
    assert count_files(ws / "classified" / "clothing") == len(list(drop.iterdir())), out.stdout
    return {"wall": wall, "cpu": cpu, **{k: timings.get(k, 0.0) for k in ("seconds", "load_seconds", "embed_seconds")}}


def log_events(log: Path) -> list[tuple[float, str]]:
    out = []
    for ln in log.read_text().splitlines():
        if m := LINE.match(ln):
            out.append((datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S.%f").timestamp(), m[3]))
    return out


def run_hmd(base: Path, drop: Path, root: Path, env: dict, keys: str, backend: str | None,
            code: Path | None = None) -> dict:
    """hmd (from `code`, another checkout, when given: its supervisor and worker) on the drop; see the module doc."""
    ws = base.parent / "ws"
    stage(base, ws)
    sock, config = root / "hmd.sock", root / "hmd.toml"
    config.write_text(f'workspace = "{ws}"\n[daemon]\nsocket = "{sock}"\ndevice = "cpu"\nlog_level = "DEBUG"\n{keys}\n'
                      + (f'[embedding]\nbackend = "{backend}"\n' if backend else ""))
    if code is not None:  # `-m` puts the working directory first on sys.path: that checkout's headmaster
        env = dict(env, PYTHONPATH=str(code))
    proc = subprocess.Popen([sys.executable, "-m", "headmaster.daemon.main", "--config", str(config)],
                            stderr=open(root / "hmd.log", "w"), env=env, cwd=code)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                s = request(sock, "status", timeout=30)
                if s["activity"] == "idle" and s["queued_tasks"] == 0:
                    break
            except Exception:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"hmd did not become idle:\n{(root / 'hmd.log').read_text()[-3000:]}")
            time.sleep(0.1)
        time.sleep(1.0)
        assert not request(sock, "status", timeout=30)["worker"]["running"], "the worker should be asleep"
        inbox, classified = ws / "inbox" / "clothing", ws / "classified" / "clothing"
        files = sorted(drop.iterdir())
        cpu0 = cpu_seconds(proc.pid)
        t0 = time.time()
        for f in files:
            shutil.copy(f, inbox / f.name)
        copied = time.time() - t0
        while count_files(classified) < len(files):
            if proc.poll() is not None:
                raise SystemExit(f"hmd died:\n{(root / 'hmd.log').read_text()[-3000:]}")
            time.sleep(0.05)
        wall = time.time() - t0
        supervisor_cpu = cpu_seconds(proc.pid) - cpu0
        pid = request(sock, "status", timeout=30)["worker"]["pid"]
        worker_cpu = cpu_seconds(pid) if pid else 0.0  # it started with the drop: all of its CPU is the drop's
    finally:
        stop_hmd(proc)
    return {"wall": wall, "copied": copied, "supervisor_cpu": supervisor_cpu, "worker_cpu": worker_cpu,
            **breakdown(log_events(root / "hmd.log"), t0)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def breakdown(events: list[tuple[float, str]], t0: float) -> dict:
    """Where hmd's time went after the drop at wall clock t0, from its own log lines."""
    after = [(t - t0, msg) for t, msg in events if t >= t0 - 0.01]
    first = lambda prefix: next((t for t, m in after if prefix in m), None)  # noqa: E731
    calls = []
    for t, m in after:
        if c := CALL.search(m):
            files, took, load, embed, new, seconds, hashed = c.groups()
            calls.append({"end": t, "start": t - float(took), "files": int(files), "took": float(took),
                          "load": float(load), "embed": float(embed), "embed_paths": float(seconds)})
    setup = next((float(re.search(r"set up ([\d.]+)s", m)[1]) for _, m in after if "set up" in m), 0.0)
    moves = sum(float(re.search(r"([\d.]+)s moving", m)[1]) for _, m in after if "s moving" in m)
    sorted_at = [t for t, m in after if m.startswith("sorted ") or m.startswith("rejected ")]
    gaps = [b["start"] - a["end"] for a, b in zip(calls, calls[1:])]
    return {
        "first_ready": first("ready to sort"), "worker_started": first("worker started"), "worker_setup": setup,
        "model_load": sum(c["load"] for c in calls), "calls": calls,
        "decode_forward": sum(c["embed"] for c in calls),
        "in_requests": sum(c["took"] for c in calls),
        "first_call_start": calls[0]["start"] if calls else None,
        "moves": moves, "gaps": sum(gaps), "gap_list": gaps,
        "last_sorted": max(sorted_at) if sorted_at else None,
        "windows": [c["files"] for c in calls],
    }


def show_hmd(r: dict) -> str:
    f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    overhead = r["in_requests"] - r["model_load"] - r["decode_forward"]
    return (f"drop copied {r['copied']:.1f}s; first files ready {f(r['first_ready'])}s; worker spawned "
            f"{f(r['worker_started'])}s, set up {r['worker_setup']:.1f}s later; requests {r['windows']} from "
            f"{f(r['first_call_start'])}s: {r['in_requests']:.1f}s in all (model load {r['model_load']:.1f}, "
            f"decode+forward {r['decode_forward']:.1f}, the rest {overhead:.1f}); gaps between requests "
            f"{r['gaps']:.1f}s; moves {r['moves']:.1f}s; last sorted {f(r['last_sorted'])}s; CPU: supervisor "
            f"{r['supervisor_cpu']:.1f}s, worker {r['worker_cpu']:.1f}s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parent.parent.parent / "shared")
    ap.add_argument("--photos", type=int, default=372)
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--work", type=Path, help="keep the trained workspace here (reused when present)")
    ap.add_argument("--daemon-keys", default="", help="extra [daemon] lines for hmd's config")
    ap.add_argument("--backend", choices=("auto", "torch", "onnxruntime"), help="for both (default: auto)")
    ap.add_argument("--compare", type=Path, help="another checkout: its hmd runs too, in every round ('other')")
    args = ap.parse_args()
    print("uptime at the start:", uptime())
    import headmaster

    print("code:", Path(headmaster.__file__).parent, "| hmd keys:", repr(args.daemon_keys) or "defaults",
          "| backend:", args.backend or "auto")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("HEADMASTER_CONFIG", None)
    work = args.work or Path(tempfile.mkdtemp(prefix="hm-vs-"))
    work.mkdir(parents=True, exist_ok=True)
    base, drop = build(work, args.shared, args.per_class, args.photos, env)
    keys = args.daemon_keys.replace("\\n", "\n")
    kinds = ["classify", "hmd"] + (["other"] if args.compare else [])
    results: list[dict] = []
    try:
        for i in range(args.pairs):
            pair = {}
            order = kinds[i % len(kinds):] + kinds[:i % len(kinds)]  # each goes first in turn
            for kind in order:
                root = work / f"run-{i}-{kind}"
                shutil.rmtree(root, ignore_errors=True)
                root.mkdir()
                try:
                    pair[kind] = (run_classify(base, drop, root, env, args.backend) if kind == "classify"
                                  else run_hmd(base, drop, root, env, keys, args.backend,
                                               args.compare if kind == "other" else None))
                finally:
                    if args.work is not None and (root / "hmd.log").exists():
                        shutil.copy(root / "hmd.log", work / f"{kind}-pair{i + 1}.log")  # kept for a closer look
                    shutil.rmtree(root, ignore_errors=True)
            c = pair["classify"]
            print(f"round {i + 1} ({', '.join(order)}): hm classify {c['wall']:.1f}s (embed_paths {c['seconds']:.1f}: "
                  f"model load {c['load_seconds']:.1f}, decode+forward {c['embed_seconds']:.1f}; CPU {c['cpu']:.1f}s); "
                  + "; ".join(f"{k} {pair[k]['wall']:.1f}s, ratio {pair[k]['wall'] / c['wall']:.2f}" for k in kinds[1:])
                  + f"  [load {uptime().split('load average: ')[-1]}]")
            for k in kinds[1:]:
                print(f"   {k}: " + show_hmd(pair[k]))
            results.append(pair)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    print(f"medians over {len(results)} rounds, {args.photos} photos: hm classify "
          f"{med([p['classify']['wall'] for p in results]):.1f}s")
    fields = ("first_ready", "worker_started", "worker_setup", "model_load", "decode_forward", "in_requests", "gaps",
              "moves", "last_sorted", "supervisor_cpu", "worker_cpu")
    for k in kinds[1:]:
        walls = [p[k]["wall"] for p in results]
        ratio = med([p[k]["wall"] / p["classify"]["wall"] for p in results])
        diff = med([p[k]["wall"] - p["classify"]["wall"] for p in results])
        print(f"  {k}{f' ({args.compare})' if k == 'other' else ''}: {med(walls):.1f}s; median ratio to hm classify "
              f"{ratio:.2f}, median difference {diff:+.1f}s; " + ", ".join(
                  f"{f} {med([p[k][f] or 0.0 for p in results]):.1f}s" for f in fields))
    print("uptime at the end:", uptime())


if __name__ == "__main__":
    main()
