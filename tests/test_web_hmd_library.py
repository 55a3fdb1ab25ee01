"""A library's queue on the page hmd serves: a real hmd subprocess with a [[library]], a real headless Chromium.

hmd tags the library (HEIC and PNG photos in nested folders), the overview shows its counts and
links its queue; labelling two photos from the keyboard and undoing one leaves one COPY in
heads/<head>/<bucket>/, the library exactly as it was (every file hashed before and after), and
the head retrained on the new example by hmd's watcher, as for any example added by hand.
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from browser import skip_reason
from helpers import fill_bucket
from PIL import Image
from test_daemon import Hmd, wait_for

from headmaster.embedding import add_model
from headmaster.embedding.images import register_heif
from headmaster.store import Store

REASON = skip_reason()  # raises in CI (CI=true) when the browser is missing: there the tests must run
needs_browser = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def photo_hashes(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every photo below `root` (our sidecars aside) -> (SHA-256, mtime_ns, inode)."""
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns, p.stat().st_ino)
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".xmp"}


@pytest.fixture(scope="module")
def hmd(tmp_path_factory, clip_path):
    root = tmp_path_factory.mktemp("hmd-web-library")
    ws = root / "workspace"
    fill_bucket(ws / "heads" / "colour" / "red", "red", 10, 0)
    fill_bucket(ws / "heads" / "colour" / "blue", "blue", 10, 100)
    with Store(ws / "headmaster.db") as store:
        add_model(store, "tiny-clip", str(clip_path), 24)
    photos = root / "Pictures"
    register_heif()
    for i, (r, b) in enumerate([(200, 60), (150, 110), (125, 125), (100, 150), (60, 200)]):
        folder = photos / ("2024" if i % 2 else "2025/trip")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 48, 3), (r, 30, b), np.uint8)).save(
            folder / (f"IMG_{i:04d}.HEIC" if i < 2 else f"mix_{i}.png"), format="HEIF" if i < 2 else None)
    daemon = Hmd(root, ws)
    daemon.config.write_text(daemon.config.read_text() + f'[[library]]\npath = "{photos}"\n')
    daemon.photos = photos
    daemon.start()
    wait_for(lambda: (libs := daemon.status()["libraries"]) and libs[0]["tagged"] == 5, 120, "the library tagged",
             daemon)
    daemon.originals = photo_hashes(photos)
    yield daemon
    daemon.kill()


def test_the_page_shows_the_librarys_counts_and_its_queue_as_json(hmd):
    url = hmd.status()["web"]["url"]
    with urllib.request.urlopen(url + "index.json", timeout=30) as r:
        lib = json.load(r)["libraries"][0]
    assert lib == {"name": "Pictures", "path": str(hmd.photos), "heads": "all", "photos": 5, "tagged": 5,
                   "pending": 0, "failed": 0, "paused": False}
    with urllib.request.urlopen(url + "heads/colour/library/Pictures.json", timeout=30) as r:
        q = json.load(r)
    assert q["library"]["scored"] == 5 and q["library"]["waiting"] == 0 and len(q["items"]) == 5
    assert [i["margin"] for i in q["items"]] == sorted(i["margin"] for i in q["items"])


@needs_browser
def test_label_two_library_photos_undo_one_the_copy_teaches_the_head_and_the_library_is_untouched(hmd, browser):
    from selenium.webdriver.common.by import By

    ws, photos = hmd.ws, hmd.photos
    url = hmd.status()["web"]["url"]
    browser.get(url)
    card = browser.find_element(By.CSS_SELECTOR, f'.head-card.library[data-library="{photos}"]')
    assert all(f in card.text for f in ("Photos\n5", "Tagged\n5", "Pending\n0", "Failed\n0")), card.text
    card.find_element(By.LINK_TEXT, "colour").click()
    wait_for(lambda: browser.current_url.endswith("/heads/colour/library/Pictures"), 30, "the library queue", hmd)
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".card.from-library")) == 5, 30, "five cards", hmd)
    wait_for(lambda: all(browser.execute_script(  # HEIC thumbnails too: rendered by the page, from the decoder
        "return Array.from(document.querySelectorAll('.card img')).map(i => i.complete && i.naturalWidth > 0)")),
        30, "every thumbnail to load", hmd)
    on = browser.find_element(By.CSS_SELECTOR, ".sources a.on")
    assert on.text == "library Pictures"
    cards = browser.find_elements(By.CSS_SELECTOR, ".card")
    first, second = (c.find_element(By.CSS_SELECTOR, ".name").text for c in cards[:2])
    retrains = hmd.head()["retrains"]

    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys("1")  # blue: the first card, then the next
    body.send_keys("2")  # red
    body.send_keys("u")  # undo the second
    wait_for(lambda: "undone" in browser.find_element(By.ID, "toast").get_attribute("textContent"), 30,
             "the undo to be answered", hmd)
    heads = ws / "heads" / "colour"
    wait_for(lambda: (heads / "blue" / first).is_file() and not (heads / "red" / second).exists(), 30,
             "the copy on disk and the undone one gone", hmd)
    assert browser.find_element(By.ID, "left").text == "4"
    assert photo_hashes(photos) == hmd.originals  # not one library file moved, changed or rewritten

    h = wait_for(lambda: (h := hmd.head()) and h["retrains"] > retrains and not h["training"]
                 and not h["pending_retrain"] and h, 90, "the head to retrain on the copy", hmd)
    assert h["images"] == 21 and h["buckets"] == {"blue": 11, "red": 10}
    with Store(ws / "headmaster.db") as store:
        kinds = [k for (k,) in store.conn.execute("SELECT kind FROM corrections ORDER BY id")]
    assert kinds == ["library", "library", "unlearned"]
    maps = Path(f"/proc/{hmd.proc.pid}/maps")
    if maps.exists():  # the ranking ran in the worker: the supervisor that serves the page has no torch
        assert "torch" not in maps.read_text()
    wait_for(lambda: hmd.status()["libraries"][0]["tagged"] == 5, 60, "the re-tag after the retrain", hmd)
    assert photo_hashes(photos) == hmd.originals
