"""hmd's two processes, for real: the torch-free supervisor and its worker, which sleeps, crashes and comes back.

One daemon (idle timeout 2 s, 4 images per worker request, the test-only crash hook on
for files named *crashme*, a short delay in every decision so a kill lands mid-batch)
serves the tests in file order; a second one runs on a damaged database.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import colour_image, fill_bucket
from test_daemon import SETTLE, Hmd, digest, files_in, make_workspace, wait_for


HM = [sys.executable, "-m", "headmaster.cli"]
IDLE = 2.0
HEAVY = ("torch", "transformers", "timm", "headmaster.heads.mlp", "headmaster.heads.base", "headmaster.heads.checkpoint", "headmaster.embedding.embedders", "headmaster.heads.sorting",
         "headmaster.heads.training", "headmaster.curation.ranking")


def hm(ws: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([*HM, "-w", str(ws), *args], capture_output=True, text=True, timeout=120, env=env)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_supervisor_never_imports_torch():
    code = ("import sys, headmaster.daemon.main, headmaster.daemon.service, headmaster.ctl, headmaster.curation.doctor, "
            "headmaster.web.review, headmaster.web.server; "
            f"print(sorted(m for m in sys.modules if m in {HEAVY!r} or m.split('.')[0] in {HEAVY!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def site(tmp_path_factory, clip_path):
    root = tmp_path_factory.mktemp("hmd-worker")
    return root, make_workspace(root, clip_path)


@pytest.fixture(scope="module")
def hmd(site):
    root, ws = site
    daemon = Hmd(root, ws, daemon_keys=f"model_idle_seconds = {IDLE}\nmax_batch_images = 4\n",
                 env={"HEADMASTER_TEST_CRASH_ON": "crashme", "HEADMASTER_TEST_DECIDE_DELAY": "0.2"}).start()
    yield daemon
    daemon.kill()


def worker(hmd: Hmd) -> dict:
    return hmd.status()["worker"]


def test_ready_before_any_model_loads_then_trains_in_the_worker(hmd):
    wait_for(lambda: "READY=1" in hmd.notifications, 10, "READY=1", hmd)
    wait_for(lambda: (h := hmd.head()) and h["trained"] and not h["training"], 120, "the head to be trained", hmd)
    log = hmd.log_path.read_text()
    assert log.index("ready in") < log.index("worker started")  # the socket answered before the model loaded
    s = hmd.status()
    assert s["pid"] == hmd.proc.pid and s["worker"]["pid"] != hmd.proc.pid
    assert s["rss_mib"] is None or s["rss_mib"] > 0


def test_a_new_inbox_file_wakes_the_worker_while_it_settles(hmd):
    """The first inbox event starts the sleeping worker and loads the model and head at once; the file itself is
    read only once settled (here 60 s: long after the warm-up), and the warmed worker then sorts it."""
    wait_for(lambda: (w := worker(hmd)) and not w["running"] and w["idle_exits"] >= 1, IDLE + 30,
             "the idle worker to exit", hmd)
    before = worker(hmd)
    settle = f"settle_seconds = {SETTLE}"
    hmd.config.write_text(hmd.config.read_text().replace(settle, "settle_seconds = 60.0"))
    assert hmd.ctl("reload").returncode == 0
    photo = colour_image(hmd.ws / "inbox" / "colour" / "early_wake_red.png", "red", 7700)
    warmed = "worker warmed up: model tiny-clip loaded and run once, head checkpoint loaded"
    wait_for(lambda: warmed in hmd.log_path.read_text(), 45, "the worker to warm up", hmd)
    s = hmd.status()
    assert photo.exists() and s["settling"] >= 1  # still settling: nothing has read it yet
    w = s["worker"]
    assert w["running"] and w["model_loaded"] and w["busy"] is None
    assert w["starts"] == before["starts"] + 1 and w["warmups"] == before["warmups"] + 1
    hmd.config.write_text(hmd.config.read_text().replace("settle_seconds = 60.0", settle))
    assert hmd.ctl("reload").returncode == 0
    os.utime(photo)  # a change: it settles again, on the short setting now
    wait_for((hmd.ws / "classified" / "colour" / "red" / photo.name).exists, 60, "the file to be sorted", hmd)
    assert worker(hmd)["starts"] == before["starts"] + 1  # sorted by the worker that warmed up


def test_the_worker_exits_when_idle_and_a_new_file_wakes_it(hmd):
    w = wait_for(lambda: (w := worker(hmd)) and not w["running"] and w["idle_exits"] >= 1 and w, IDLE + 30,
                 "the idle worker to exit", hmd)
    assert w["pid"] is None and not w["model_loaded"]
    assert "not running, model not loaded" in hmd.ctl("status").stdout
    starts = w["starts"]
    # from now on the model stays loaded (model_idle_seconds = 0, applied by a reload): fewer slow starts
    hmd.config.write_text(hmd.config.read_text().replace(f"model_idle_seconds = {IDLE}", "model_idle_seconds = 0"))
    assert hmd.ctl("reload").returncode == 0
    colour_image(hmd.ws / "inbox" / "colour" / "wake_red.png", "red", 7777)
    wait_for((hmd.ws / "classified" / "colour" / "red" / "wake_red.png").exists, 90, "the file to be sorted", hmd)
    w = worker(hmd)
    assert w["starts"] == starts + 1 and w["idle_seconds"] == 0 and w["running"]
    assert w["model_loaded"] and w["rss_mib"] and alive(w["pid"])
    shown = hmd.ctl("status").stdout
    assert f"Worker: pid {w['pid']}" in shown and "model loaded since" in shown and "stays loaded" in shown


def test_a_worker_that_stops_answering_stops_the_watchdog_pings_and_the_log_says_why(hmd):
    """WATCHDOG_USEC is 1 s here: the pings (every 0.5 s) go on only while the job thread moves. A worker stopped
    with SIGSTOP gets a request it never answers; the pings stop, the log and status say why; SIGCONT: they resume."""
    w = worker(hmd)
    assert w["running"] and w["idle_seconds"] == 0  # loaded and staying (the test above)
    log_start = len(hmd.log_path.read_text())
    dest = hmd.ws / "classified" / "colour" / "red" / "stuck_red.png"
    os.kill(w["pid"], signal.SIGSTOP)
    try:
        colour_image(hmd.ws / "inbox" / "colour" / "stuck_red.png", "red", 7800)
        wait_for(lambda: "watchdog: not pinging systemd" in hmd.log_path.read_text()[log_start:], 30,
                 "the watchdog to stop pinging", hmd)
        line = next(x for x in hmd.log_path.read_text()[log_start:].splitlines() if "not pinging systemd" in x)
        assert "the job thread has been on 'settled'" in line
        assert f"waits for the worker (pid {w['pid']}) in 'decide'" in line and "is stopped (SIGSTOP)" in line
        pings = hmd.notifications.count("WATCHDOG=1")
        time.sleep(1.5)  # three ping intervals
        assert hmd.notifications.count("WATCHDOG=1") == pings
        s = hmd.status()  # answered from a snapshot while the job thread waits
        assert s["watchdog"]["pinging"] is False and "'decide'" in s["watchdog"]["why_not"]
        assert s["job"]["task"] == "settled" and s["watchdog_stalls"] >= 1
        assert "Watchdog: NOT pinging systemd: the job thread has been on 'settled'" in hmd.ctl("status").stdout
        assert not dest.exists()
    finally:
        os.kill(w["pid"], signal.SIGCONT)
    wait_for(dest.exists, 60, "the file to be sorted once the worker runs again", hmd)
    wait_for(lambda: "pinging systemd again" in hmd.log_path.read_text()[log_start:], 10, "the pings to resume", hmd)
    pings = hmd.notifications.count("WATCHDOG=1")
    wait_for(lambda: hmd.notifications.count("WATCHDOG=1") > pings, 5, "a watchdog ping", hmd)
    assert hmd.status()["watchdog"]["pinging"] is True and worker(hmd)["pid"] == w["pid"]  # the same worker


def test_kill_9_of_the_worker_mid_batch_loses_and_doubles_nothing(hmd):
    inbox, classified = hmd.ws / "inbox" / "colour", hmd.ws / "classified" / "colour"
    originals = {digest(p): p.name for p in (
        [colour_image(inbox / f"w_red_{i:02d}.png", "red", 6000 + i) for i in range(8)]
        + [colour_image(inbox / f"w_blue_{i:02d}.png", "blue", 7000 + i) for i in range(8)])}
    w = wait_for(lambda: (w := worker(hmd)) and w["busy"] == "decide" and w, 60, "the worker to be deciding", hmd)
    os.kill(w["pid"], signal.SIGKILL)
    wait_for(lambda: not any(inbox.iterdir()), 90, "the inbox to empty after the crash", hmd)
    counts: dict[str, int] = {}
    for p in files_in(classified):
        counts[digest(p)] = counts.get(digest(p), 0) + 1
    for h, name in originals.items():
        assert counts.get(h) == 1, f"{name} exists {counts.get(h, 0)} times"
    assert not list((classified / "_rejected").glob("w_*"))  # one crash is not the files' fault
    s = hmd.status()
    assert s["pid"] == hmd.proc.pid and s["worker"]["crashes"] >= 1
    assert "killed by SIGKILL" in hmd.log_path.read_text()


def test_a_file_that_crashes_the_worker_twice_goes_to_rejected(hmd):
    inbox, classified = hmd.ws / "inbox" / "colour", hmd.ws / "classified" / "colour"
    crashes = worker(hmd)["crashes"]
    colour_image(inbox / "crashme.png", "red", 8000)
    good = [colour_image(inbox / f"c_red_{i}.png", "red", 8100 + i) for i in range(3)]
    wait_for(lambda: not any(inbox.iterdir()), 120, "the inbox to empty", hmd)
    assert (classified / "_rejected" / "crashme.png").is_file()
    assert all((classified / "red" / g.name).is_file() for g in good)
    assert worker(hmd)["crashes"] == crashes + 2
    log = hmd.log_path.read_text()
    assert "crashme.png" in log and "crashed the decoder" in log
    assert hmd.proc.poll() is None
    maps = Path(f"/proc/{hmd.proc.pid}/maps")
    if maps.exists():  # after sorting, learning and hashing, torch is still not in the supervisor
        assert "torch" not in maps.read_text()


def test_a_damaged_checkpoint_is_reported_and_never_trained_over_unasked(hmd, tmp_path):
    checkpoint = hmd.ws / "out" / "colour.pt"
    garbage = b"this is not a checkpoint" * 100
    checkpoint.write_bytes(garbage)
    colour_image(hmd.ws / "inbox" / "colour" / "after_damage.png", "blue", 9000)
    problems = wait_for(lambda: hmd.status()["problems"], 30, "the problem to show in status", hmd)
    assert "cannot read checkpoint" in problems["checkpoint colour"]
    assert "PROBLEM: checkpoint colour" in hmd.ctl("status").stdout
    # hm says the same in one line
    src = tmp_path / "src"
    colour_image(src / "x.png", "red", 1)
    out = hm(hmd.ws, "classify", "--head", "colour", "--src", str(src))
    assert out.returncode == 1 and out.stderr.startswith("Error: ") and "checkpoint" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    # a change to the labelled set does not train over it
    colour_image(hmd.ws / "heads" / "colour" / "red" / "new_red.png", "red", 9100)
    time.sleep(3 * 1.0 + 1.0)  # past the debounce (1 s) and the retrain it would trigger
    assert checkpoint.read_bytes() == garbage
    assert (hmd.ws / "inbox" / "colour" / "after_damage.png").exists()
    assert "cannot read checkpoint" in hmd.log_path.read_text()
    # the user asks: the damaged file is kept aside, a new head is trained and the waiting file sorted
    assert hmd.ctl("retrain", "colour").returncode == 0
    wait_for((hmd.ws / "classified" / "colour" / "blue" / "after_damage.png").exists, 120, "the file to be sorted",
             hmd)
    assert (hmd.ws / "out" / "colour.pt.damaged").read_bytes() == garbage
    assert "checkpoint colour" not in hmd.status()["problems"]
    assert "Traceback" not in hmd.log_path.read_text()


def test_a_damaged_database_is_reported_and_kept(tmp_path):
    ws = tmp_path / "workspace"
    fill_bucket(ws / "heads" / "colour" / "red", "red", 3, 0)
    garbage = os.urandom(8192)
    (ws / "headmaster.db").write_bytes(garbage)
    daemon = Hmd(tmp_path, ws)
    try:
        daemon.start()
        problems = wait_for(lambda: daemon.status()["problems"], 30, "the problem in status", daemon)
        assert "damaged or not a headmaster database" in problems["database"]
        assert "PROBLEM: database" in daemon.ctl("status").stdout
        assert daemon.ctl("rescan").returncode == 0  # tries again, reports again, lives on
        time.sleep(1.0)
        assert daemon.proc.poll() is None
        assert (ws / "headmaster.db").read_bytes() == garbage
        assert "database" in daemon.log_path.read_text() and "Traceback" not in daemon.log_path.read_text()
        out = hm(ws, "status")
        assert out.returncode == 1 and out.stderr.startswith("Error: the database") and "Traceback" not in out.stderr
        refused = hm(ws, "doctor", "--rebuild-cache")
        assert refused.returncode == 1 and "hmd is running" in refused.stderr
        assert daemon.terminate() == 0
    finally:
        daemon.kill()
    checked = hm(ws, "doctor")
    assert checked.returncode == 1 and "DAMAGED  database" in checked.stdout
    rebuilt = hm(ws, "doctor", "--rebuild-cache")
    assert rebuilt.returncode == 0, rebuilt.stderr
    kept = list(ws.glob("headmaster.db.damaged-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == garbage
    assert "model registry could not be read" in rebuilt.stderr
    assert hm(ws, "doctor").returncode == 0


def test_a_bad_config_is_one_line_and_an_exit_status_systemd_does_not_restart(tmp_path):
    config = tmp_path / "hmd.toml"
    config.write_text('[daemon]\nmodel_idle_seconds = -1\n')
    out = subprocess.run([sys.executable, "-m", "headmaster.daemon.main", "--config", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 78  # RestartPreventExitStatus=78 in systemd/hmd.service: no crash loop
    assert out.stderr.strip().splitlines() == [
        f"Error: config {config}: 'daemon.model_idle_seconds' must be 0 (stay loaded) or more, got -1.0"]
    assert "RestartPreventExitStatus=78" in (Path(__file__).parent.parent / "systemd" / "hmd.service").read_text()
