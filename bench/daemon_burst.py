"""Daemon benchmark: a burst of N new examples -> how many retrains, how long; idle CPU.

    uv run python bench/daemon_burst.py [--files 1000] [--debounce 5]

Builds a temporary workspace with the tiny random CLIP from tests/helpers.py (no network),
starts the real `hmd`, copies N images into heads/colour/red/ at once, and polls
`hmctl status --json` until hmd is idle again. Memory is shown for both of hmd's processes;
bench/daemon_footprint.py measures them on real photos.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import build_clip, fill_bucket  # noqa: E402

from headmaster.daemon import request  # noqa: E402
from headmaster.embedding import add_model  # noqa: E402
from headmaster.store import Store  # noqa: E402


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def memory_mib(pid: int) -> tuple[float, float]:
    """(resident now, resident peak) of a process, MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def start_hmd(root: Path, ws: Path, daemon_keys: str = "", env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    """hmd on `ws` with settle_seconds 0.5 on the CPU (plus `daemon_keys`), logging to root/hmd.log."""
    sock = root / "hmd.sock"
    config = root / "hmd.toml"
    config.write_text(f'workspace = "{ws}"\n[daemon]\nsocket = "{sock}"\nsettle_seconds = 0.5\ndevice = "cpu"\n'
                      f'{daemon_keys}')
    proc = subprocess.Popen([sys.executable, "-m", "headmaster.daemon.main", "--config", str(config)],
                            stderr=open(root / "hmd.log", "w"), env=env)
    return proc, sock


def stop_hmd(proc: subprocess.Popen) -> None:
    """SIGTERM, and how long hmd took to exit."""
    proc.send_signal(signal.SIGTERM)
    t = time.perf_counter()
    code = proc.wait(timeout=20)
    print(f"SIGTERM -> exit {code} in {time.perf_counter() - t:.1f}s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--debounce", type=float, default=5.0)
    ap.add_argument("--idle-seconds", type=float, default=30.0)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hm-bench-"))
    try:
        ws = root / "workspace"
        fill_bucket(ws / "heads/colour/red", "red", 20, 0)
        fill_bucket(ws / "heads/colour/blue", "blue", 20, 100)
        with Store(ws / "headmaster.db") as store:
            add_model(store, "tiny-clip", str(build_clip(root / "tiny-clip")), 24)
        burst = fill_bucket(root / "burst", "red", args.files, 10_000)
        t0 = time.perf_counter()
        proc, sock = start_hmd(root, ws, f"debounce_seconds = {args.debounce}\n")

        def status() -> dict | None:
            try:
                return request(sock, "status", timeout=30)
            except Exception:
                return None

        def idle(retrains: int) -> dict | None:
            s = status()
            if not s:
                return None
            h = s["heads"]["colour"]
            quiet = s["settling"] == 0 and s["queued_tasks"] == 0 and s["activity"] == "idle"
            return s if quiet and h["retrains"] >= retrains and not h["pending_retrain"] else None

        while not idle(1):
            time.sleep(0.2)
        print(f"start-up to first trained head: {time.perf_counter() - t0:.1f}s")
        ticks = cpu_ticks(proc.pid)
        time.sleep(args.idle_seconds)
        used = (cpu_ticks(proc.pid) - ticks) / os.sysconf("SC_CLK_TCK")
        print(f"idle CPU: {used:.2f}s over {args.idle_seconds:.0f}s")
        rss_idle = memory_mib(proc.pid)[0]
        worker_idle = status()["worker"]["rss_mib"] or 0  # 0: the worker has exited (model_idle_seconds)
        t1 = time.perf_counter()
        for p in burst:
            shutil.copy(p, ws / "heads/colour/red" / p.name)
        copied = time.perf_counter() - t1
        while not (s := idle(2)):
            time.sleep(0.2)
        done = time.perf_counter() - t1
        time.sleep(args.debounce * 1.5)
        s = status()
        h = s["heads"]["colour"]
        print(f"burst of {args.files} files (copied in {copied:.2f}s): {h['retrains'] - 1} retrain(s), "
              f"idle and trained on {h['images']} images {done:.1f}s after the copy started")
        rss_after, rss_peak = memory_mib(proc.pid)
        worker_after = s["worker"]["rss_mib"] or 0
        print(f"memory (supervisor + worker): resident {rss_idle:.0f} + {worker_idle:.0f} MiB idle after start-up, "
              f"{rss_after:.0f} + {worker_after:.0f} MiB idle after the burst (supervisor peak {rss_peak:.0f} MiB)")
        stop_hmd(proc)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
