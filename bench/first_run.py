"""What a new user waits for: `hm --help`, a workspace error, `hm status`, and `hm demo` (first and later runs).

    uv run python bench/first_run.py [--runs 5] [--no-demo]

Each command runs as `uv run hm ...` in a fresh process, as a user types it; the wall time includes
Python's start-up and uv's. The demo runs twice with a temporary cache: first with no converted backbone
(the conversion is part of the first run), then in a new folder with the backbone ready. Needs no ../shared.
Prints one line per command (median and all runs) and the demo's own report lines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed(args: list[str], env: dict, cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    result = subprocess.run(["uv", "run", "--project", str(REPO), *args], capture_output=True, text=True,
                            env=env, cwd=cwd)
    return time.perf_counter() - started, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-demo", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = dict(os.environ, HEADMASTER_CACHE_DIR=str(tmp / "cache"), HF_HUB_OFFLINE="1",
                   HEADMASTER_WORKSPACE=str(tmp / "empty"))
        (tmp / "empty" / "heads").mkdir(parents=True)
        print(f"load average before: {os.getloadavg()[0]:.2f}")
        for label, cmd in (("hm --help", ["hm", "--help"]), ("hm status (empty workspace)", ["hm", "status"]),
                           ("hm train (no heads: an error)", ["hm", "train"]),
                           ("hm train --head nope (an error)", ["hm", "train", "--head", "nope"])):
            times = []
            for _ in range(args.runs):
                seconds, result = timed(cmd, env, tmp)
                times.append(seconds)
            print(f"{label:<34} median {statistics.median(times):5.2f} s  runs "
                  + " ".join(f"{t:.2f}" for t in times) + f"  (exit {result.returncode})")
        if not args.no_demo:
            for label, folder in (("hm demo, first run (converts)", "demo1"), ("hm demo, backbone ready", "demo2")):
                seconds, result = timed(["hm", "--no-progress", "demo", str(tmp / folder)], env, tmp)
                if result.returncode != 0:
                    sys.exit(f"{label} failed:\n{result.stderr}")
                report = [l for l in result.stdout.splitlines() if l.startswith(("Accuracy", "Done"))]
                print(f"{label:<34} {seconds:6.1f} s  | " + " | ".join(report))
        print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
