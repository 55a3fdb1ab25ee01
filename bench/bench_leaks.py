"""How cheap is the leak check in `hm status --head H`? It reads no image: one stat per file + one index query.

Usage: uv run python bench/bench_leaks.py [N]   (N files in heads/H, N/10 in test/H; default 5000)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from headmaster.embedding import Context, EmbedOptions
from headmaster.evaluation import indexed_leaks
from headmaster.evaluation.duplicates import hashed_leaks


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "workspace"
        for i in range(n):
            p = ws / "heads" / "h" / ("a" if i % 2 else "b") / f"{i:06d}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(i.to_bytes(4, "little") * 256)  # 1 KiB of distinct content; never decoded here
        for i in range(n // 10):
            p = ws / "test" / "h" / "a" / f"t{i:06d}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes((1 if i == 0 else n + i).to_bytes(4, "little") * 256)  # t000000 copies 000001: 1 leak
        with Context.open(str(ws), EmbedOptions(progress=False)) as c:
            t0 = time.perf_counter()
            leaks = hashed_leaks(c, "h")  # first pass hashes every file (what confusion-matrix does)
            t1 = time.perf_counter()
            runs = []
            for _ in range(3):
                t = time.perf_counter()
                again, unknown = indexed_leaks(c.workspace, c.store, "h")  # what status does
                runs.append(time.perf_counter() - t)
        print(f"{n + n // 10} files: hashed_leaks (reads all) {t1 - t0:.2f}s, found {len(leaks)}; "
              f"indexed_leaks (status, reads none) best of 3 {min(runs):.3f}s, found {len(again)}, {unknown} unknown")


if __name__ == "__main__":
    main()
