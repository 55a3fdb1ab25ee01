"""bench/embed.py --tiny: the throughput benchmark still runs end to end and prints its table (no timing asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_embed_tiny_prints_the_table(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "embed.py"), "--tiny", "--work", str(tmp_path),
                          "--json", str(tmp_path / "numbers.json")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    table = out.stdout
    for row in ("| (a) forward only", "| (b) naive loop", "| (c) hm embed, embedding rate", "| (c) hm start-up",
                "| (c) model load", "| (d) c/a", "| (d) c/b", "| (d) peak RSS of hm",
                "| (e) 2nd hm embed, beyond start-up", "| (e) growth per 1000 files"):
        assert row in table, f"missing row {row!r} in:\n{table}"
    assert "Machine:" in table and "|---|---|---|" in table
    # the bench itself checks that the second embed over the unchanged tree hashed and embedded nothing
    assert (tmp_path / "numbers.json").stat().st_size > 0
