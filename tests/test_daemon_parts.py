"""The daemon's parts as plain objects: debounce bookkeeping, settle detection, event routing, freshness, the heartbeat."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from helpers import colour_image, fill_bucket
from watchdog.events import (DirCreatedEvent, FileClosedEvent, FileCreatedEvent, FileDeletedEvent, FileModifiedEvent,
                             FileMovedEvent)

from headmaster.daemon.heartbeat import Heartbeat, WorkerCall, sample_process
from headmaster.daemon.inbox import Verdict, inbox_files, resolve_leftovers, sort_files
from headmaster.daemon.state import DaemonState, needs_retrain
from headmaster.daemon.watcher import Settler, WorkspaceHandler
from headmaster.fileops import remove_stale_temps
from headmaster.heads import save_checkpoint
from headmaster.store import Store
from headmaster.workspace import Workspace


def test_debounce_is_capped_by_max_delay(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    state = DaemonState()
    assert state.mark_dirty("h", debounce=30, max_delay=100) == 30
    clock[0] += 20
    assert state.mark_dirty("h", debounce=30, max_delay=100) == 30  # quiet period restarts
    clock[0] += 60
    assert state.mark_dirty("h", debounce=30, max_delay=100) == 20  # but never past first change + 100
    clock[0] += 30
    assert state.mark_dirty("h", debounce=30, max_delay=100) == 0
    assert state.heads["h"].pending
    state.begin_retrain("h")
    assert not state.heads["h"].pending
    assert state.mark_dirty("h", debounce=30, max_delay=100) == 30  # a new window


def test_settler_waits_for_quiet_and_for_the_writer_to_close(tmp_path):
    settler = Settler(settle_seconds=0.05, track_close=True)
    done = tmp_path / "done.png"
    done.write_bytes(b"x" * 10)
    writing = tmp_path / "writing.png"
    writing.write_bytes(b"x" * 10)
    empty = tmp_path / "empty.png"
    empty.touch()
    gone = tmp_path / "gone.png"
    gone.write_bytes(b"x")
    settler.touch(done)
    settler.touch(writing, writing=True)
    settler.touch(empty)
    settler.touch(gone)
    gone.unlink()
    assert settler.check()[0] == []  # nothing has been still long enough
    time.sleep(0.1)
    settled, next_due = settler.check()
    assert settled == [done]  # still open for writing, empty, or vanished: not settled
    assert next_due is not None and len(settler) == 2
    settler.closed(writing)
    time.sleep(0.1)
    assert settler.check()[0] == [writing]
    assert settler.is_pending(empty)  # an empty file waits for the long timeout


def test_a_file_its_writer_closed_settles_sooner_than_one_moved_in(tmp_path):
    """With closes reported (inotify), a closed file needs only CLOSED_SETTLE_S of quiet; a file that came without
    a close, or changed after its close, waits the whole settle_seconds."""
    from headmaster.daemon.watcher import CLOSED_SETTLE_S

    settler = Settler(settle_seconds=5 * CLOSED_SETTLE_S, track_close=True)
    copied, moved, reopened = (tmp_path / n for n in ("copied.png", "moved.png", "reopened.png"))
    for f in (copied, moved, reopened):
        f.write_bytes(b"x" * 10)
    settler.touch(copied, writing=True)
    settler.closed(copied)
    os.utime(copied, ns=(1, 10**18))  # cp -p / copy2 set the original's mtime after the close: still closed
    due = settler.touch(copied)
    settler.touch(moved)  # a rename into the folder: no close event
    settler.touch(reopened, writing=True)
    settler.closed(reopened)
    reopened.write_bytes(b"y" * 20)  # written again after its close
    settler.touch(reopened)
    assert due - time.monotonic() <= CLOSED_SETTLE_S
    time.sleep(CLOSED_SETTLE_S + 0.1)
    settled, next_due = settler.check()
    assert settled == [copied] and next_due is not None and next_due - time.monotonic() > CLOSED_SETTLE_S
    plain = Settler(settle_seconds=5 * CLOSED_SETTLE_S, track_close=False)  # no inotify: no shortcut
    assert plain.closed(copied) - time.monotonic() > CLOSED_SETTLE_S


def test_a_settled_file_stays_known_until_it_changes_or_goes(tmp_path):
    """What the sorter asks of a file that settled in an earlier check than the one its job came from: without
    it, such a file was put back to settle again (a second settle_seconds wait in a burst)."""
    settler = Settler(settle_seconds=0.05, track_close=False)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    assert not settler.was_settled(a)
    settler.touch(a)
    settler.touch(b)
    time.sleep(0.1)
    assert sorted(settler.check()[0]) == [a, b] and settler.was_settled(a) and settler.was_settled(b)
    a.write_bytes(b"aa")  # changed since: not known complete any more
    assert not settler.was_settled(a)
    settler.forget(b)
    assert not settler.was_settled(b)


def test_a_file_that_keeps_changing_is_not_settled(tmp_path):
    settler = Settler(settle_seconds=0.1, track_close=False)
    f = tmp_path / "grow.png"
    f.write_bytes(b"a")
    settler.touch(f)
    for i in range(4):
        time.sleep(0.05)
        f.write_bytes(b"a" * (i + 2))
        assert settler.check()[0] == []
    time.sleep(0.15)
    assert settler.check()[0] == [f]


class Recorder:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args))


def test_events_are_routed_by_area(tmp_path):
    heads, inbox, out, classified = (tmp_path / n for n in ("heads", "inbox", "out", "classified"))
    sink = Recorder()
    h = WorkspaceHandler(heads, inbox, out, sink, classified_dir=classified)
    h.dispatch(FileCreatedEvent(str(heads / "c" / "red" / "a.png")))
    h.dispatch(FileModifiedEvent(str(heads / "c" / "red" / "notes.txt")))  # not an image: ignored
    h.dispatch(FileClosedEvent(str(inbox / "c" / "b.jpg")))
    h.dispatch(FileCreatedEvent(str(inbox / "c" / ".hidden.jpg")))  # hidden: ignored
    h.dispatch(FileCreatedEvent(str(inbox / "c" / "download.jpg.part")))  # still downloading: ignored
    h.dispatch(FileDeletedEvent(str(heads / "c" / "red" / "a.png")))
    h.dispatch(FileMovedEvent(str(out / ".c.x.tmp"), str(out / "c.pt")))
    h.dispatch(FileMovedEvent(str(classified / "c" / "uncertain" / "d.png"), str(classified / "c" / "blue" / "d.png")))
    h.dispatch(FileCreatedEvent(str(classified / "c" / "uncertain" / "e.png")))  # uncertain teaches nothing
    names = [c[0] for c in sink.calls]
    assert names == ["example_changed", "inbox_closed", "example_removed", "checkpoint_written", "classified_changed"]
    assert sink.calls[3] == ("checkpoint_written", "c")
    assert sink.calls[4][1:3] == ("c", "blue")


def test_library_events_are_photos_only(tmp_path):
    photos = tmp_path / "photos"
    sink = Recorder()
    h = WorkspaceHandler(tmp_path / "heads", tmp_path / "inbox", tmp_path / "out", sink, libraries=[photos])
    h.dispatch(FileCreatedEvent(str(photos / "2024" / "a.jpg")))
    h.dispatch(FileMovedEvent(str(photos / ".hm-tmp-1"), str(photos / "2024" / "a.jpg.xmp")))  # our sidecar: ignored
    h.dispatch(FileCreatedEvent(str(photos / "b.jpg.part")))  # still downloading: ignored
    h.dispatch(FileClosedEvent(str(photos / "c.heic")))
    h.dispatch(FileDeletedEvent(str(photos / "2024" / "a.jpg")))
    h.dispatch(DirCreatedEvent(str(photos / "trip")))
    h.dispatch(FileCreatedEvent(str(tmp_path / "elsewhere" / "d.jpg")))  # outside every library: ignored
    assert sink.calls == [("library_changed", photos / "2024" / "a.jpg", False), ("library_closed", photos / "c.heic"),
                          ("library_removed", photos / "2024" / "a.jpg"), ("library_folder", photos)]


def test_needs_retrain_compares_sources_and_mtimes(tmp_path):
    ws = Workspace(tmp_path)
    fill_bucket(ws.heads_dir / "c" / "red", "red", 2)
    fill_bucket(ws.heads_dir / "c" / "blue", "blue", 2, 10)
    assert needs_retrain(ws, "c", "m").reason == "no checkpoint yet"
    sources = {b: sorted(p.relative_to(ws.heads_dir).as_posix() for p in (ws.heads_dir / "c" / b).iterdir())
               for b in ("blue", "red")}
    checkpoint = {"type": "binary", "input_dim": 4, "model": "m", "model_state_dict": {}, "classes": ["blue", "red"],
                  "sources": sources}
    save_checkpoint(checkpoint, ws.checkpoint_path("c"))
    assert not needs_retrain(ws, "c", "m").retrain
    assert "active model is 'other'" in needs_retrain(ws, "c", "other").reason
    extra = colour_image(ws.heads_dir / "c" / "red" / "new.png", "red", 99)
    assert needs_retrain(ws, "c", "m").reason == "+1 / -0 images since training"
    extra.unlink()
    later = os.stat(ws.checkpoint_path("c")).st_mtime_ns + 10**9
    first = next((ws.heads_dir / "c" / "red").iterdir())
    os.utime(first, ns=(later, later))
    assert needs_retrain(ws, "c", "m").reason == "images modified since training"


def test_stale_temps_spare_a_write_in_flight(tmp_path):
    old, new = tmp_path / "a" / ".hm-tmp-old", tmp_path / ".hm-tmp-new"
    old.parent.mkdir()
    old.write_bytes(b"cut short")
    os.utime(old, (time.time() - 60,) * 2)
    new.write_bytes(b"being written")
    photo = colour_image(tmp_path / "a" / "photo.png", "red", 1)
    assert remove_stale_temps(tmp_path, older_than_s=5) == 1
    assert not old.exists() and new.exists() and photo.exists()


def test_resolve_leftovers_keeps_one_copy(tmp_path):
    inbox, classified = tmp_path / "inbox", tmp_path / "classified"
    a = colour_image(inbox / "c" / "a.png", "red", 1)
    b = colour_image(inbox / "c" / "b.png", "red", 2)
    c = colour_image(inbox / "c" / "c.png", "red", 3)
    (classified / "c" / "red").mkdir(parents=True)
    os.link(a, classified / "c" / "red" / "a.png")  # crash after link, before unlink
    (classified / "c" / "red" / "b_1.png").write_bytes(b.read_bytes())  # cross-device copy under a clash name
    (classified / "c" / "red" / ".hm-tmp-abc").write_bytes(b"partial")
    with Store(tmp_path / "db") as store:
        left = resolve_leftovers(store, inbox, classified)
    assert left.temps == 1 and sorted(p.name for p, _ in left.duplicates) == ["a.png", "b.png"]
    assert inbox_files(inbox / "c") == [c]  # a genuinely new file stays
    assert sorted(p.name for p in (classified / "c" / "red").iterdir()) == ["a.png", "b_1.png"]


def _wait_state(pid: int, states: str) -> None:
    deadline = time.monotonic() + 10
    while (sample := sample_process(pid)) is None or sample.state not in states:
        assert time.monotonic() < deadline, f"pid {pid} never reached state {states}: {sample}"
        time.sleep(0.01)


def _cpu_moved(pid: int, since: int) -> None:
    deadline = time.monotonic() + 10
    while sample_process(pid).cpu_ticks <= since:
        assert time.monotonic() < deadline, f"pid {pid} used no CPU time in 10 s"
        time.sleep(0.02)


def test_the_heartbeat_is_fresh_while_idle_or_moving_and_says_why_when_stuck():
    clock = [1000.0]
    beat = Heartbeat(clock=lambda: clock[0])
    beat.idle()
    clock[0] += 10_000
    assert beat.check(60) is None  # waiting for work is never stuck
    beat.begin("retrain")
    clock[0] += 59
    assert beat.check(60) is None
    beat.beat()  # a long task moved on (a worker call returned, a file was placed)
    clock[0] += 59
    assert beat.check(60) is None
    clock[0] += 2
    why = beat.check(60)
    assert why is not None and "'retrain' for 120s" in why and "has not moved for 61s" in why
    assert beat.snapshot() == {"task": "retrain", "for_s": 120.0, "moved_s_ago": 61.0}
    beat.idle()
    assert beat.check(60) is None and beat.snapshot()["task"] is None


def test_a_worker_call_moves_while_the_process_uses_cpu_and_not_once_it_is_stopped():
    """A real busy process stands in for the worker: its CPU time is its progress; SIGSTOP ends it."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        clock = [1000.0]
        beat = Heartbeat(clock=lambda: clock[0])
        beat.begin("settled")
        call = WorkerCall("decide", busy.pid, clock[0])
        assert beat.check(5, call, busy.pid) is None
        for _ in range(3):  # minutes of a long call, as long as the worker keeps working
            ticks = sample_process(busy.pid).cpu_ticks
            _cpu_moved(busy.pid, ticks)
            clock[0] += 6
            assert beat.check(5, call, busy.pid) is None
        os.kill(busy.pid, signal.SIGSTOP)
        _wait_state(busy.pid, "T")
        assert beat.check(5, call, busy.pid) is None  # the CPU time it used before it stopped still counts
        clock[0] += 6
        why = beat.check(5, call, busy.pid)
        assert why is not None and f"worker (pid {busy.pid}) in 'decide'" in why and "is stopped (SIGSTOP)" in why
        assert "'settled' for 24s" in why
        os.kill(busy.pid, signal.SIGCONT)
        _wait_state(busy.pid, "R")
        _cpu_moved(busy.pid, sample_process(busy.pid).cpu_ticks)
        assert beat.check(5, call, busy.pid) is None  # working again: fresh again
    finally:
        busy.kill()
        busy.wait()
    assert sample_process(busy.pid) is None  # gone


def test_sort_files_asks_for_the_next_window_while_it_moves_this_one(tmp_path):
    """The worker embeds window 2 while the supervisor moves window 1 (decide on a helper thread), and files
    that settled meanwhile (`more`) join the next request; every file is moved once and logged."""
    inbox, dest = tmp_path / "inbox" / "c", tmp_path / "classified" / "c"
    first = [colour_image(inbox / f"a{i}.png", "red", i) for i in range(4)]
    late = [colour_image(inbox / f"b{i}.png", "blue", 10 + i) for i in range(3)]
    asked: list[tuple[list[str], str]] = []
    second_asked = threading.Event()
    overlapped: list[bool] = []

    def decide(paths):
        asked.append(([p.name for p in paths], threading.current_thread().name))
        if len(asked) == 2:
            second_asked.set()
        return [Verdict(p, "red" if p.name.startswith("a") else "blue", f"h-{p.name}", 0.9) for p in paths]

    def on_placed(p):
        if p.source == first[0]:  # window 1's first move: window 2 must already be asked for
            overlapped.append(second_asked.wait(10))

    handed = []

    def more():
        handed.append(len(handed))
        return late if len(handed) == 1 else []

    with Store(tmp_path / "db") as store:
        result = sort_files(store, "c", decide, first, dest, on_placed=on_placed, chunk=2, more=more)
        logged = {r["source"]: r["destination"] for r in store.sorts("c")}
    assert overlapped == [True]
    assert [names for names, _ in asked] == [["a0.png", "a1.png"], ["a2.png", "a3.png"], ["b0.png", "b1.png"],
                                             ["b2.png"]]
    assert all(thread != threading.current_thread().name for _, thread in asked)
    assert len(result.placed) == 7 and not inbox_files(inbox)
    assert sorted(p.name for p in (dest / "red").iterdir()) == [p.name for p in first]
    assert sorted(p.name for p in (dest / "blue").iterdir()) == [p.name for p in late]
    assert len(logged) == 7 and handed == [0, 1]


def test_sort_files_stops_with_a_window_in_flight_and_leaves_its_files(tmp_path):
    """Told to stop while the next window is being decided: what is not placed stays in the inbox, none twice."""
    inbox, dest = tmp_path / "inbox" / "c", tmp_path / "classified" / "c"
    files = [colour_image(inbox / f"a{i}.png", "red", i) for i in range(4)]
    stop = threading.Event()

    def decide(paths):
        if paths[0] != files[0]:
            stop.set()  # hmd is told to stop while window 2 is being decided
        return [Verdict(p, "red", f"h-{p.name}", 0.9) for p in paths]

    with Store(tmp_path / "db") as store:
        result = sort_files(store, "c", decide, files, dest, should_stop=stop.is_set, chunk=2)
    moved = sorted(p.name for p in (dest / "red").iterdir()) if (dest / "red").exists() else []
    assert sorted(moved + [p.name for p in inbox_files(inbox)]) == [p.name for p in files]  # each file once
    assert len(result.placed) == len(moved) < 4


def test_a_workspace_inside_a_library_is_not_part_of_it(tmp_path):
    from headmaster.config import LibraryConfig
    from headmaster.daemon.library import _library_state, _wanted

    lib = _library_state(LibraryConfig(str(tmp_path / "Pictures")), tmp_path / "Pictures" / "headmaster")
    assert lib.exclude == [tmp_path / "Pictures" / "headmaster"]
    assert _wanted(lib, tmp_path / "Pictures" / "2024" / "a.jpg")
    assert not _wanted(lib, tmp_path / "Pictures" / "headmaster" / "heads" / "hue" / "red" / "b.jpg")
    assert _wanted(lib, tmp_path / "Pictures" / "headmaster-old" / "c.jpg")
    assert _library_state(LibraryConfig(str(tmp_path / "Pictures")), tmp_path / "ws").exclude == []
