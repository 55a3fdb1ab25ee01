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
from browser import skip_reason
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


FIELDS = ".head-top h2, .head-top .tag, .buckets li, .facts dt, .facts dd, .actions .button, .head-card > .warning"
WIDTHS = (375, 768, 1360)  # a phone, a tablet, a desktop


def set_width(driver, width: int) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 600})


def layout(driver, card: str, fields: str) -> dict:
    """The bounding boxes of each card's fields, the card's own box, and whether the page scrolls sideways."""
    return driver.execute_script("""
        const [cardSel, fieldSel] = arguments;
        const box = el => {  // the element's box and its text's, which overflows a box that is too narrow
          const r = el.getBoundingClientRect(), range = document.createRange();
          range.selectNodeContents(el);
          const t = range.getBoundingClientRect();
          if (!t.width) return [r.left, r.top, r.right, r.bottom];
          return [Math.min(r.left, t.left), Math.min(r.top, t.top), Math.max(r.right, t.right), Math.max(r.bottom, t.bottom)];
        };
        return {scroll: document.documentElement.scrollWidth - document.documentElement.clientWidth,
                cards: Array.from(document.querySelectorAll(cardSel)).map(c => ({box: box(c),
                  fields: Array.from(c.querySelectorAll(fieldSel)).map(f => ({text: f.innerText.trim().replace(/\\s+/g, " "),
                                                                           box: box(f)}))}))};
    """, card, fields)


def collisions(measured: dict) -> list[str]:
    """Every pair of fields whose boxes overlap, and every field that sticks out of its card."""
    out = []
    for card in measured["cards"]:
        cl, ct, cr, cb = card["box"]
        fields = card["fields"]
        for i, a in enumerate(fields):
            al, at, ar, ab = a["box"]
            if al < cl - 0.5 or ar > cr + 0.5:
                out.append(f"{a['text']!r} sticks out of its card ({al:.0f}-{ar:.0f} vs {cl:.0f}-{cr:.0f})")
            for b in fields[i + 1:]:
                bl, bt, br, bb = b["box"]
                if min(ar, br) - max(al, bl) > 0.5 and min(ab, bb) - max(at, bt) > 0.5:
                    out.append(f"{a['text']!r} overlaps {b['text']!r}")
    return out


@needs_browser
def test_the_overview_cards_and_the_queue_lay_out_without_overlap_from_phone_to_desktop(hmd, browser):
    url = hmd.status()["web"]["url"]
    try:
        for width in WIDTHS:
            set_width(browser, width)
            browser.get(url)
            measured = layout(browser, ".head-card", FIELDS)
            assert measured["cards"] and len(measured["cards"][0]["fields"]) >= 8, measured
            texts = [f["text"] for f in measured["cards"][0]["fields"]]
            assert any(t.startswith("20") and ":" in t for t in texts), texts  # the date that ran into the accuracy
            assert collisions(measured) == [], (width, measured)
            assert measured["scroll"] <= 0, f"the overview scrolls sideways at {width} px"
            browser.get(url + "heads/colour")
            queue = layout(browser, ".card", ".name, .guess, .choices button, .new-bucket input[type=text], .new-bucket button")
            assert collisions(queue) == [], (width, queue)
            assert queue["scroll"] <= 0, f"the queue scrolls sideways at {width} px"
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


@needs_browser
def test_skip_and_a_new_bucket_from_the_keyboard_and_undo_takes_the_bucket_away(hmd, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    ws = hmd.ws
    uncertain = ws / "classified" / "colour" / "uncertain"
    uncertain.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        Image.fromarray(np.full((40, 48, 3), (160, 40 + 20 * i, 200), np.uint8)).save(uncertain / f"violet_{i}.png")
    url = hmd.status()["web"]["url"]
    browser.get(url + "heads/colour")
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".card")) >= 2, 30, "the cards", hmd)
    toast = lambda: browser.find_element(By.ID, "toast").get_attribute("textContent")  # noqa: E731
    cards = browser.find_elements(By.CSS_SELECTOR, ".card")
    skipped, made = (c.find_element(By.CSS_SELECTOR, ".name").text for c in cards[:2])
    left = int(browser.find_element(By.ID, "left").text)
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys("s")
    wait_for(lambda: toast().startswith("skipped"), 10, "the skip", hmd)
    assert browser.find_element(By.ID, "left").text == str(left - 1) and (uncertain / skipped).is_file()

    body.send_keys("n")
    active = browser.switch_to.active_element
    assert active.get_attribute("name") == "name"  # n: the focused card's new-bucket field
    active.send_keys("violet", Keys.ENTER)
    folder = ws / "heads" / "colour" / "violet"
    wait_for(lambda: folder.is_dir() and len(list(folder.iterdir())) == 1, 30, "the new bucket", hmd)
    assert (ws / "classified" / "colour" / "violet" / made).is_file() and not (uncertain / made).exists()
    wait_for(lambda: "add 19 more examples" in toast(), 10, "the note on what the bucket needs", hmd)
    assert browser.find_element(By.CSS_SELECTOR, '#legend [data-key="3"]').get_attribute("data-bucket") == "violet"
    assert (uncertain / skipped).is_file()  # skip moved nothing

    body.send_keys("u")
    wait_for(lambda: not folder.exists() and (uncertain / made).is_file(), 30, "the undo", hmd)
    wait_for(lambda: not browser.find_elements(By.CSS_SELECTOR, '[data-bucket="violet"]'), 10,
             "the bucket to leave the page", hmd)
    h = wait_for(lambda: (h := hmd.head()) and not h["training"] and not h["pending_retrain"] and h, 60,
                 "the head to settle", hmd)
    assert set(h["buckets"]) == {"blue", "red"}
