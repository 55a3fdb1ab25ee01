"""The review page served by a real hmd subprocess: over plain HTTP, and in a real headless Chromium.

Labelling three images with the keyboard and undoing one must leave exactly what moving the
files by hand would: two files in their buckets, learned once each, the head retrained, and the
undone file back in uncertain/. The browser test skips only where no chromium is installed
outside CI.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from browser import skip_reason, start_chromium
from helpers import fill_bucket
from PIL import Image
from test_daemon import Hmd, wait_for

from headmaster.embedding import add_model
from headmaster.store import Store

REASON = skip_reason()  # raises in CI (CI=true) when the browser is missing: there the tests must run
needs_browser = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture(scope="module")
def hmd(tmp_path_factory, clip_path):
    root = tmp_path_factory.mktemp("hmd-web")
    ws = root / "workspace"
    fill_bucket(ws / "heads" / "colour" / "red", "red", 10, 0)
    fill_bucket(ws / "heads" / "colour" / "blue", "blue", 10, 100)
    with Store(ws / "headmaster.db") as store:
        add_model(store, "tiny-clip", str(clip_path), 24)
    daemon = Hmd(root, ws).start()
    wait_for(lambda: (h := daemon.head()) and h["trained"] and not h["training"], 120, "the head to train", daemon)
    yield daemon
    daemon.kill()


@pytest.fixture(scope="module")
def browser():
    if REASON is not None:
        pytest.skip(REASON)
    driver = start_chromium()
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def loaded_images(driver) -> list[int]:
    return driver.execute_script("return Array.from(document.querySelectorAll('.card img'))"
                                 ".map(i => i.complete ? i.naturalWidth : -1)")


def test_hmd_serves_the_page_on_loopback_with_its_rules(hmd):
    web = hmd.status()["web"]
    url, port = web["url"], int(web["url"].rsplit(":", 1)[1].strip("/"))
    assert url.startswith("http://127.0.0.1:") and web["token"] is False
    with urllib.request.urlopen(url + "index.json", timeout=30) as r:
        status = json.load(r)
    assert status["daemon"] is True and status["heads"]["colour"]["retrains"] >= 1
    assert status["heads"]["colour"]["buckets"] == {"blue": 10, "red": 10}

    def answer(method: str, path: str, **headers: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request(method, path, body=b"{}", headers={"Host": f"127.0.0.1:{port}", **headers})
        code = conn.getresponse().status
        conn.close()
        return code

    assert answer("GET", "/", Host="rebound.example") == 421
    assert answer("POST", "/api/undo") == 403  # no CSRF token
    assert answer("GET", "/api/undo") == 405
    assert answer("GET", "/images/" + "a" * 64) == 404
    assert answer("GET", "/images/..%2Fheadmaster.db") == 404


@needs_browser
def test_label_three_with_the_keyboard_undo_one_and_the_head_learns(hmd, browser):
    from selenium.webdriver.common.by import By

    ws = hmd.ws
    uncertain = ws / "classified" / "colour" / "uncertain"
    uncertain.mkdir(parents=True)
    for i, (r, b) in enumerate([(200, 60), (150, 110), (125, 125), (100, 150), (60, 200)]):
        Image.fromarray(np.full((40, 48, 3), (r, 30, b), np.uint8)).save(uncertain / f"mix_{i}.png")
    url = hmd.status()["web"]["url"]
    assert url.startswith("http://127.0.0.1:")
    assert f"Review page: {url}" in hmd.ctl("status").stdout

    browser.get(url)
    card = browser.find_element(By.CSS_SELECTOR, '.head-card[data-head="colour"]')
    assert "blue" in card.text and "red" in card.text

    browser.get(url + "heads/colour")
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".card")) == 5, 30, "five cards", hmd)
    wait_for(lambda: all(w > 0 for w in loaded_images(browser)), 30, "every thumbnail to load", hmd)
    assert len(loaded_images(browser)) == 5
    names = [c.get_attribute("data-id") for c in browser.find_elements(By.CSS_SELECTOR, ".card")]
    shown = [c.find_element(By.CSS_SELECTOR, ".name").text for c in browser.find_elements(By.CSS_SELECTOR, ".card")]
    assert sorted(shown) == [f"mix_{i}.png" for i in range(5)] and len(set(names)) == 5
    retrains = hmd.head()["retrains"]
    browser.execute_script("window.__sameDocument = true")

    body = browser.find_element(By.TAG_NAME, "body")
    for key in "121":  # blue, red, blue: each label takes the focused card and moves on to the next
        body.send_keys(key)
    body.send_keys("u")  # undo the third
    first, second, third = shown[:3]
    classified = ws / "classified" / "colour"
    # the page sends actions one after another; the undo's message says all four reached the server
    wait_for(lambda: "undone" in browser.find_element(By.ID, "toast").get_attribute("textContent"), 30,
             "the undo to be answered", hmd)
    wait_for(lambda: (classified / "blue" / first).is_file() and (classified / "red" / second).is_file()
             and (uncertain / third).is_file(), 30, "the moves and the undo on disk", hmd)
    assert not (classified / "blue" / third).exists() and not (uncertain / first).exists()
    wait_for(lambda: browser.find_element(By.ID, "left").text == "3", 10, "the queue to show 3 left", hmd)

    h = wait_for(lambda: (h := hmd.head()) and h["retrains"] > retrains and not h["training"]
                 and not h["pending_retrain"] and h, 60, "the head to retrain", hmd)
    assert h["examples_from_corrections"] == 2 and h["images"] == 22
    blue_example = ws / "heads" / "colour" / "blue" / f"{sha(classified / 'blue' / first)}.png"
    red_example = ws / "heads" / "colour" / "red" / f"{sha(classified / 'red' / second)}.png"
    assert blue_example.is_file() and red_example.is_file()
    assert not any(p.name.startswith(sha(uncertain / third)) for p in (ws / "heads").rglob("*.png"))
    with Store(ws / "headmaster.db") as store:
        kinds = store.conn.execute("SELECT hash, kind FROM corrections ORDER BY id").fetchall()
    counted = {k: [h for h, kind in kinds if kind == k] for k in ("correction", "unlearned")}
    assert len(counted["correction"]) == 3 and len(set(counted["correction"])) == 3  # each learned once
    assert counted["unlearned"] == [sha(uncertain / third)]

    # the page follows the daemon by itself: the new retrain count shows without a reload
    wait_for(lambda: browser.find_element(By.CSS_SELECTOR, '[data-live="retrains"]').text
             == str(hmd.head()["retrains"]), 15, "the page to show the retrain", hmd)
    assert browser.execute_script("return window.__sameDocument") is True
    maps = Path(f"/proc/{hmd.proc.pid}/maps")
    if maps.exists():  # the page ranked, labelled and taught; the model work ran in the worker, not here
        assert "torch" not in maps.read_text()
        assert hmd.status()["worker"]["starts"] >= 1
