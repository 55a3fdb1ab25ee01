"""hmd keeping a [[library]] tagged: a real hmd subprocess, the tiny CLIP model, a folder of photos beside the workspace.

The tests build on each other, in file order: the library is tagged once its head trains; a
new photo is tagged when it settles; a retrain rewrites only the sidecars whose decision
changed; a restart repeats nothing; a vanished library pauses and resumes untouched; a kill -9
in the middle of a larger batch leaves every sidecar whole. No photo's bytes ever change.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import urllib.request
from pathlib import Path

import pytest
from helpers import colour_image, fill_bucket
from test_daemon import Hmd, wait_for

from headmaster.curation.xmp import decode_sidecar, read_records
from headmaster.embedding import add_model
from headmaster.store import Store

COLOURS = ("red", "blue", "green", "yellow")


def photo_hashes(root: Path) -> dict[str, str]:
    """Every file below `root` but the sidecars (ours, and temp files a kill may leave) -> its SHA-256."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix != ".xmp" and not p.name.startswith(".hm-tmp-")}


def sidecars(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*.xmp"))}


def decisions(ws: Path, root: Path) -> dict[str, str]:
    with sqlite3.connect(ws / "headmaster.db") as db:
        return dict(db.execute("SELECT path, bucket FROM tags WHERE head = 'hue' AND path LIKE ?", (f"{root}%",)))


@pytest.fixture(scope="module")
def site(tmp_path_factory, clip_path):
    root = tmp_path_factory.mktemp("hmd-library")
    ws = root / "workspace"
    for i, colour in enumerate(("red", "blue", "green")):
        fill_bucket(ws / "heads" / "hue" / colour, colour, 8, 100 * i)
    with Store(ws / "headmaster.db") as store:
        add_model(store, "tiny-clip", str(clip_path), 24)
    photos = root / "photos"
    for i, colour in enumerate(COLOURS):
        colour_image(photos / "2024" / f"{colour}.png", colour, 1000 + i)
        colour_image(photos / "2025" / "trip" / f"{colour}.png", colour, 1100 + i)
    colour_image(photos / ".thumbs" / "hidden.png", "red", 1200)  # hidden folder: never tagged
    (photos / "notes.txt").write_text("not a photo\n")
    (photos / "2024" / "broken.jpg").write_bytes(b"not a jpeg at all")  # listed, fails, counted as failed
    return root, ws, photos


@pytest.fixture(scope="module")
def hmd(site):
    root, ws, photos = site
    daemon = Hmd(root, ws, daemon_keys="max_batch_images = 16\n")
    daemon.config.write_text(daemon.config.read_text() + f'[[library]]\npath = "{photos}"\nheads = ["hue"]\n')
    daemon.originals = photo_hashes(photos)
    daemon.start()
    yield daemon
    daemon.kill()


def library(hmd: Hmd) -> dict:
    return hmd.status()["libraries"][0]


def settled(hmd: Hmd, photos: int, failed: int = 1) -> dict:
    return wait_for(lambda: (lib := library(hmd))["photos"] == photos and lib["tagged"] == photos - failed
                    and lib["failed"] == failed and lib, 120, f"{photos - failed} photos tagged", hmd)


def library_lines(hmd: Hmd, photos: Path, since: int = 0) -> list[str]:
    return [line.split(" INFO    ", 1)[-1] for line in hmd.log_path.read_text()[since:].splitlines()
            if f"library {photos}: tagged" in line]


def test_the_library_is_tagged_once_its_head_is_trained(hmd, site):
    _, ws, photos = site
    lib = settled(hmd, 9)
    assert lib == {"path": str(photos), "heads": ["hue"], "photos": 9, "tagged": 8, "pending": 0, "failed": 1,
                   "paused": False}
    tagged = sorted(Path(p).relative_to(photos).as_posix() for p in sidecars(photos))
    assert tagged == sorted(f"{d}/{c}.png.xmp" for d in ("2024", "2025/trip") for c in COLOURS)
    image, xmp = decode_sidecar((photos / "2024" / "red.png.xmp").read_bytes())
    assert read_records(xmp)["hue"]["bucket"] == "red"
    assert library_lines(hmd, photos) == [f"library {photos}: tagged 8 photo(s), 0 unchanged, 1 failed"]
    assert "library {}: cannot tag 2024/broken.jpg: ".format(photos) in hmd.log_path.read_text()
    assert photo_hashes(photos) == hmd.originals
    shown = hmd.ctl("status")
    assert f"Library: {photos}: 9 photos, 8 tagged, 0 pending, 1 failed" in shown.stdout, shown.stdout + shown.stderr
    with urllib.request.urlopen(hmd.status()["web"]["url"] + "index.json", timeout=30) as r:
        assert json.load(r)["libraries"][0]["tagged"] == 8

def test_a_new_photo_is_tagged_when_it_settles(hmd, site):
    _, ws, photos = site
    new = colour_image(photos / "2025" / "new_blue.png", "blue", 1300)
    hmd.originals[str(new)] = hashlib.sha256(new.read_bytes()).hexdigest()
    settled(hmd, 10)
    assert Path(f"{new}.xmp").is_file()
    assert library_lines(hmd, photos)[-1] == f"library {photos}: tagged 1 photo(s), 0 unchanged, 0 failed"
    edited = photos / "2024" / "blue.png"  # the user edits a photo: it is tagged again, as what it is now
    assert read_records(decode_sidecar(Path(f"{edited}.xmp").read_bytes())[1])["hue"]["bucket"] == "blue"
    colour_image(edited, "red", 1301)
    hmd.originals[str(edited)] = hashlib.sha256(edited.read_bytes()).hexdigest()
    wait_for(lambda: decisions(ws, photos)[str(edited)] == "red", 60, "the edited photo to be tagged again", hmd)
    image, xmp = decode_sidecar(Path(f"{edited}.xmp").read_bytes())
    assert read_records(xmp)["hue"]["bucket"] == "red"
    settled(hmd, 10)


def test_a_retrain_rewrites_only_the_changed_decisions(hmd, site):
    _, ws, photos = site
    before, written = decisions(ws, photos), sidecars(photos)
    retrains, mark = hmd.head("hue")["retrains"], len(hmd.log_path.read_text())
    fill_bucket(ws / "heads" / "hue" / "yellow", "yellow", 8, 300)  # a new bucket: the yellow photos change
    wait_for(lambda: hmd.head("hue")["retrains"] > retrains, 120, "the retrain", hmd)
    lines = wait_for(lambda: library_lines(hmd, photos, mark), 120, "the re-tag after the retrain", hmd)
    after, rewritten = decisions(ws, photos), sidecars(photos)
    changed = {p for p in after if after[p] != before[p]}
    assert {p[:-4] for p in rewritten if rewritten[p] != written[p]} == changed  # those, and only those
    assert 0 < len(changed) < 9
    assert all(after[p] == "yellow" for p in changed)
    assert lines == [f"library {photos}: tagged {len(changed)} photo(s), {9 - len(changed)} unchanged, 0 failed"]
    assert photo_hashes(photos) == hmd.originals


def test_a_restart_repeats_no_work(hmd, site):
    _, ws, photos = site
    written = {p: os.stat(p).st_mtime_ns for p in sidecars(photos)}
    assert hmd.terminate() == 0
    mark = len(hmd.log_path.read_text())
    hmd.start()
    wait_for(lambda: "start-up checks done" in hmd.log_path.read_text()[mark:], 60, "start-up", hmd)
    settled(hmd, 10)
    # only the photo that failed is tried again (its decoder verdict is remembered: it is not decoded again)
    assert library_lines(hmd, photos, mark) == [f"library {photos}: tagged 0 photo(s), 0 unchanged, 1 failed"]
    assert {p: os.stat(p).st_mtime_ns for p in sidecars(photos)} == written


def test_a_vanished_library_pauses_and_resumes_untouched(hmd, site):
    root, ws, photos = site
    written, records = sidecars(photos), decisions(ws, photos)
    away = root / "unmounted"
    os.rename(photos, away)
    wait_for(lambda: library(hmd)["paused"], 60, "the library to pause", hmd)
    assert hmd.log_path.read_text().count(f"library {photos}: paused: path missing") == 1
    assert decisions(ws, photos) == records  # nothing untagged
    os.rename(away, photos)
    wait_for(lambda: not library(hmd)["paused"] and f"library {photos}: resumed" in hmd.log_path.read_text(), 60,
             "the library to resume", hmd)
    settled(hmd, 10)
    assert sidecars(photos) == written
    new = colour_image(photos / "after.png", "red", 1400)  # watched again
    hmd.originals[str(new)] = hashlib.sha256(new.read_bytes()).hexdigest()
    settled(hmd, 11)


def test_a_deleted_photo_is_forgotten_its_sidecar_kept(hmd, site):
    _, ws, photos = site
    photo = photos / "after.png"
    assert str(photo) in decisions(ws, photos)
    photo.unlink()
    del hmd.originals[str(photo)]
    wait_for(lambda: str(photo) not in decisions(ws, photos) and library(hmd)["photos"] == 10, 60,
             "the deleted photo's records to go", hmd)
    assert Path(f"{photo}.xmp").is_file()  # never deleted by us
    settled(hmd, 10)


def test_kill_9_mid_batch_leaves_every_sidecar_whole(hmd, site):
    root, ws, photos = site
    burst = photos / "burst"
    for i in range(120):
        p = colour_image(root / "card" / f"b{i:03d}.png", COLOURS[i % 4], 2000 + i)
        hmd.originals[str(burst / p.name)] = hashlib.sha256(p.read_bytes()).hexdigest()
    os.rename(root / "card", burst)  # a folder moved in: one listing, tagged 16 at a time
    wait_for(lambda: any(burst.glob("*.xmp")), 120, "tagging to begin", hmd)
    worker = hmd.status()["worker"]["pid"]
    os.kill(hmd.proc.pid, signal.SIGKILL)
    if worker:
        try:
            os.kill(worker, signal.SIGKILL)
        except ProcessLookupError:
            pass
    hmd.proc.wait(timeout=10)
    assert len(list(burst.glob("*.xmp"))) < 120  # killed mid-batch
    for sidecar in photos.rglob("*.xmp"):
        image, xmp = decode_sidecar(sidecar.read_bytes())  # old or new, never half-written
        assert "hue" in read_records(xmp)
    temps = list(photos.rglob(".hm-tmp-*"))  # a write cut short; aged, as a crash's leftover is by the next start
    for t in temps:
        os.utime(t, (t.stat().st_mtime - 60,) * 2)
    (photos / "2024" / ".hm-tmp-in-flight").write_bytes(b"another process writes this now")  # new: left alone
    hmd.start()
    settled(hmd, 130)
    assert [p.name for p in photos.rglob(".hm-tmp-*")] == [".hm-tmp-in-flight"]
    if temps:
        assert f"library {photos}: removed {len(temps)} temporary file(s)" in hmd.log_path.read_text()
    for sidecar in photos.rglob("*.xmp"):
        decode_sidecar(sidecar.read_bytes())
    assert photo_hashes(photos) == hmd.originals
    assert "Traceback" not in hmd.log_path.read_text()
