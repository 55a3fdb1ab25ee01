"""hmd's footprint on real photos: memory of the supervisor and the worker, wake-up latency, a 1,000-photo drop.

    uv run python bench/daemon_footprint.py [--shared ../shared] [--burst 1000] [--per-class 30] [--idle 10]

Builds a workspace with one head, `clothing`, from the first --per-class photos of each class of
<shared>/data/clothing/train, registers <shared>/models/efficientnet-lite0 and trains the head with
`hm train` (so hmd starts with nothing to do). Then, on the same --burst further photos:
  1. `hm classify` in a copy of that workspace (cold cache for the burst photos), wall time;
  2. hmd with model_idle_seconds = --idle: time until its socket answers; resident memory of the
     supervisor alone (the worker is not started: nothing to do);
  3. one photo dropped into the idle daemon: time until it is in classified/ (settle_seconds 0.5 s
     included), then memory with the worker loaded;
  4. the burst dropped into the inbox at once: time until every photo is sorted, the worker's peak
     memory during it, both processes' memory after it;
  5. the idle timeout: when the worker exits, and the supervisor's memory then.
Memory is VmRSS from /proc (MiB). Prints `uptime` first: the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from daemon_burst import start_hmd, stop_hmd  # bench/ is on sys.path when this script runs

from headmaster.daemon import request
from headmaster.daemon.worker_client import rss_mib

HM = [sys.executable, "-m", "headmaster.cli"]


def photos(shared: Path, per_class: int, burst: int) -> tuple[dict[str, list[Path]], list[Path]]:
    """(examples per class, burst photos): examples are the first per_class of each train class; the burst
    takes the rest of train, then validation, round-robin over classes."""
    train = shared / "data" / "clothing" / "train"
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    examples, rest = {}, []
    for c in classes:
        files = sorted((train / c).iterdir())
        examples[c] = files[:per_class]
        rest.append(files[per_class:] + sorted((shared / "data" / "clothing" / "validation" / c).iterdir()))
    pool = [f for group in zip(*rest) for f in group] if rest else []
    pool += [f for group in rest for f in group[min(len(g) for g in rest):]]
    if len(pool) < burst + 1:
        raise SystemExit(f"only {len(pool)} photos left for the burst")
    return examples, pool[: burst + 1]


def count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parent.parent.parent / "shared")
    ap.add_argument("--burst", type=int, default=1000)
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--idle", type=float, default=10.0, help="model_idle_seconds for this run")
    args = ap.parse_args()
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    examples, pool = photos(args.shared, args.per_class, args.burst)
    single, burst = pool[0], pool[1:]
    root = Path(tempfile.mkdtemp(prefix="hm-footprint-"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("HEADMASTER_CONFIG", None)
    proc = None
    try:
        ws = root / "workspace"
        for c, files in examples.items():
            (ws / "heads" / "clothing" / c).mkdir(parents=True)
            for f in files:
                shutil.copy(f, ws / "heads" / "clothing" / c / f.name)
        run([*HM, "-w", str(ws), "model-add", "--name", "lite0", "--path",
             str(args.shared / "models" / "efficientnet-lite0"), "--dim", "1280"], env=env)
        t = time.perf_counter()
        run([*HM, "-w", str(ws), "train", "--head", "clothing"], env=env)
        print(f"hm train on {sum(map(len, examples.values()))} examples: {time.perf_counter() - t:.1f}s")

        # 1. hm classify on the burst, in a copy of the trained workspace (same head, cold cache for the burst)
        other = root / "workspace-classify"
        shutil.copytree(ws, other)
        src = root / "burst-src"
        src.mkdir()
        for f in burst:
            shutil.copy(f, src / f.name)
        t = time.perf_counter()
        run([*HM, "-w", str(other), "classify", "--head", "clothing", "--src", str(src)], env=env)
        classify_s = time.perf_counter() - t
        print(f"hm classify, {len(burst)} photos (one process, start-up and model load included): {classify_s:.1f}s")

        # 2. hmd start-up, supervisor alone
        t = time.perf_counter()
        proc, sock = start_hmd(root, ws, f"model_idle_seconds = {args.idle}\n", env)

        def status() -> dict:
            return request(sock, "status", timeout=60)

        while True:
            try:
                request(sock, "ping", timeout=5)
                break
            except Exception:
                time.sleep(0.01)
        answering = time.perf_counter() - t
        time.sleep(0.5)
        ready = [ln.split(" ready in ")[1].split(":")[0] for ln in (root / "hmd.log").read_text().splitlines()
                 if " ready in " in ln]
        print(f"hmd socket answering {answering:.2f}s after exec (interpreter start-up and imports included; "
              f"hmd's own log: ready in {ready[0] if ready else '?'} after its imports)")
        while status()["activity"] != "idle":
            time.sleep(0.1)
        time.sleep(2.0)
        s = status()
        assert not s["worker"]["running"], "the worker should not have started: nothing to do"
        print(f"supervisor alone, idle: {s['rss_mib']:.0f} MiB (worker not running)")

        # 3. one photo into the idle daemon (worker asleep)
        classified = ws / "classified" / "clothing"
        inbox = ws / "inbox" / "clothing"
        t = time.perf_counter()
        shutil.copy(single, inbox / single.name)
        while count_files(classified) < 1:
            time.sleep(0.02)
        one_s = time.perf_counter() - t
        s = status()
        w = s["worker"]
        print(f"one photo into an idle daemon (worker asleep) -> sorted: {one_s:.1f}s (settle 0.5 s included)")
        print(f"supervisor + loaded worker: {s['rss_mib']:.0f} + {w['rss_mib']:.0f} = "
              f"{s['rss_mib'] + w['rss_mib']:.0f} MiB")

        # 4. the burst
        peak_worker = 0.0
        t = time.perf_counter()
        for f in burst:
            shutil.copy(f, inbox / f.name)
        copied = time.perf_counter() - t
        last_pid = None
        while count_files(classified) < len(burst) + 1:
            pid = status()["worker"]["pid"]
            if pid:
                last_pid = pid
                peak_worker = max(peak_worker, rss_mib(pid) or 0)
            time.sleep(0.2)
        burst_s = time.perf_counter() - t
        done = time.monotonic()
        s = status()
        w = s["worker"]
        rejected = count_files(classified / "_rejected")
        print(f"{len(burst)} photos dropped (copied in {copied:.1f}s) -> all sorted: {burst_s:.1f}s "
              f"({len(burst) / burst_s:.1f} photos/s; hm classify {classify_s:.1f}s; {rejected} rejected)")
        print(f"worker peak during the burst: {peak_worker:.0f} MiB (sampled every 0.2 s)")
        print(f"after the burst: supervisor {s['rss_mib']:.0f} MiB, worker {w['rss_mib'] or 0:.0f} MiB "
              f"(pid {last_pid})")

        # 5. the idle timeout
        while status()["worker"]["running"]:
            time.sleep(0.1)
        gone = time.monotonic() - done
        time.sleep(1.0)
        s = status()
        print(f"worker exited {gone:.1f}s after the last sort (model_idle_seconds = {args.idle:g}); "
              f"supervisor then: {s['rss_mib']:.0f} MiB")
        stop_hmd(proc)
        proc = None
    finally:
        if proc is not None:
            proc.kill()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
