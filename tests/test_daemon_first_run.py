"""`hmd` on a workspace with no heads yet: it starts, says what to do next, and waits without using the CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_hmd_without_heads_says_what_to_do_and_idles(tmp_path):
    ws = tmp_path / "workspace"
    config = tmp_path / "hmd.toml"
    config.write_text(f'workspace = "{ws}"\n[daemon]\nsocket = "{tmp_path / "hmd.sock"}"\n')
    log = tmp_path / "hmd.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("HEADMASTER_CONFIG", None)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "headmaster.daemon.main", "--config", str(config)],
                                stdout=out, stderr=out, env=env)
    try:
        deadline = time.monotonic() + 90
        while "no heads yet" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        line = next(l for l in log.read_text().splitlines() if "no heads yet" in l)
        assert f"{ws / 'heads'}/<head>/<bucket>/" in line and "drop example photos" in line
        time.sleep(1.0)  # let start-up finish
        before = _cpu_seconds(proc.pid)
        time.sleep(3.0)
        assert _cpu_seconds(proc.pid) - before < 0.15  # waiting on file events, not polling
        text = log.read_text()  # no heads, so no model is needed yet: none is prepared or registered
        assert "Preparing the built-in backbone" not in text and "Registered the built-in" not in text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
