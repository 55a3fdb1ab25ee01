"""Review page benchmark: page load with 1,000 uncertain images, and 100 keyboard labels, in headless Chromium.

    uv run python bench/review_page.py [--shared ../shared] [--uncertain 1000] [--labels 100]
    uv run python bench/review_page.py --model lite0 --uncertain 60 --labels 0 --screenshot /tmp/review.png

Builds a temporary workspace from the clothing photos in ../shared/data/clothing (a four-bucket
head, 25 photos a bucket; --uncertain other photos in classified/clothing/uncertain/), embeds
them with the tiny random CLIP of the tests (quick to set up; the page's work does not depend on
the model) or, with --model lite0, ../shared/models/efficientnet-lite0 (real guesses, for the
screenshot), trains the head, starts the real `hmd` and drives its page with Selenium:

- page load: navigation until every thumbnail of the first screen is decoded; cold (thumbnails
  not made yet, 1,000 images ranked on the worker) and warm (made, browser cache empty);
- labels: N presses of the keys 1..4 one WebDriver call each, until the Nth file is in its bucket on
  disk; then N more typed in bursts of ten, timed by the page itself (first key to last answer).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from browser import start_chromium  # noqa: E402
from PIL import Image  # noqa: E402
from helpers import build_clip  # noqa: E402

from headmaster.daemon import request  # noqa: E402
from headmaster.embedding import Context, EmbedOptions, add_model, embed_paths  # noqa: E402
from headmaster.heads import TrainConfig, train_one  # noqa: E402

BUCKETS = ("hat", "shoes", "shorts", "t-shirt")
PER_BUCKET = 25
FIRST_SCREEN = ("return Array.from(document.querySelectorAll('.card img')).filter(i => "
                "i.getBoundingClientRect().top < innerHeight).map(i => i.complete && i.naturalWidth > 0)")


def build_workspace(ws: Path, shared: Path, uncertain: int) -> None:
    data = shared / "data" / "clothing" / "train"
    for bucket in BUCKETS:
        for photo in sorted((data / bucket).iterdir())[:PER_BUCKET]:
            (ws / "heads" / "clothing" / bucket).mkdir(parents=True, exist_ok=True)
            shutil.copy(photo, ws / "heads" / "clothing" / bucket / photo.name)
    others = sorted(p for d in sorted(data.iterdir()) if d.name not in BUCKETS for p in d.iterdir())
    others += sorted(p for b in BUCKETS for p in sorted((data / b).iterdir())[PER_BUCKET:])
    folder = ws / "classified" / "clothing" / "uncertain"
    folder.mkdir(parents=True)
    for photo in others[:uncertain]:
        shutil.copy(photo, folder / photo.name)


def model_for(kind: str, ws: Path, shared: Path) -> tuple[str, Path, int]:
    if kind == "lite0":
        return "lite0", shared / "models" / "efficientnet-lite0", 1280
    return "tiny-clip", build_clip(ws.parent / "tiny-clip"), 24


def prepare(ws: Path, shared: Path, uncertain: int, kind: str) -> str:
    build_workspace(ws, shared, uncertain)
    name, path, dim = model_for(kind, ws, shared)
    with Context.open(str(ws), EmbedOptions(device="cpu", progress=False)) as c:
        model = add_model(c.store, name, str(path), dim)
        started = time.perf_counter()
        paths = sorted((ws / "classified" / "clothing" / "uncertain").iterdir())
        embed_paths(c.store, model, paths, device="cpu", progress=False)
        train_one(c, "clothing", TrainConfig(epochs=50))
        print(f"setup: {name}, {len(paths)} uncertain images embedded and the head trained in "
              f"{time.perf_counter() - started:.0f}s", flush=True)
    return name


def start_hmd(root: Path, ws: Path) -> tuple[subprocess.Popen, Path, str]:
    socket = root / "hmd.sock"
    config = root / "hmd.toml"
    config.write_text(f'workspace = "{ws}"\n[daemon]\nsocket = "{socket}"\ndebounce_seconds = 30.0\n'
                      f'settle_seconds = 0.5\ndevice = "cpu"\n[web]\nlisten = "127.0.0.1:0"\n')
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("HEADMASTER_CONFIG", None)
    log = open(root / "hmd.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "headmaster.daemon.main", "--config", str(config)],
                            stdout=log, stderr=log, env=env)
    deadline = time.monotonic() + 120
    while True:
        try:
            status = request(socket, "status", timeout=5)
            if status.get("web") and status.get("activity") == "idle":
                return proc, socket, status["web"]["url"]
        except Exception:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"hmd did not start:\n{(root / 'hmd.log').read_text()[-3000:]}")
        time.sleep(0.2)


def load_page(driver, url: str) -> dict[str, float]:
    started = time.perf_counter()
    driver.get(url)
    while True:
        shown = driver.execute_script(FIRST_SCREEN)
        if shown and all(shown):
            break
        time.sleep(0.01)
    total = time.perf_counter() - started
    t = driver.execute_script("const n = performance.getEntriesByType('navigation')[0];"
                              "return [n.responseStart - n.requestStart, n.domContentLoadedEventEnd]")
    return {"server_s": t[0] / 1000, "dom_s": t[1] / 1000, "screen_s": total, "images": len(shown)}


def label(driver, ws: Path, n: int) -> dict[str, float]:
    """n labels one WebDriver key press at a time, then n more typed in bursts of ten keys.

    Returns seconds until the nth file is in its bucket (one key a call: includes WebDriver's round trip
    per key), the page's own time for the bursts (first key to the last answer, from its performance
    marks), and the median ms of one label request sent straight to the server.
    """
    from selenium.webdriver.common.by import By

    body = driver.find_element(By.TAG_NAME, "body")
    base = ws / "classified" / "clothing"

    def done() -> int:
        return sum(len(list((base / b).glob("*"))) for b in BUCKETS if (base / b).is_dir())

    def cards() -> int:
        return driver.execute_script("return document.querySelectorAll('.card:not(.leaving)').length")

    keys = [str(1 + i % len(BUCKETS)) for i in range(n)]
    started = time.perf_counter()
    for key in keys:
        body.send_keys(key)
    while done() < n:
        time.sleep(0.01)
    one_by_one = time.perf_counter() - started
    driver.execute_script("performance.clearMarks()")
    for start in range(0, n, 10):
        while cards() < 10:  # a person cannot label what the page does not show yet
            time.sleep(0.01)
        body.send_keys("".join(keys[start:start + 10]))
    while True:  # every answer is in the page (the file is in its bucket a moment before its answer arrives)
        marks = driver.execute_script("return [performance.getEntriesByName('hm-action'), performance."
                                      "getEntriesByName('hm-action-done')].map(l => l.map(m => m.startTime))")
        if len(marks[1]) >= n:
            break
        time.sleep(0.01)
    assert len(marks[0]) == n and done() == 2 * n, (len(marks[0]), done())
    page = (max(marks[1]) - min(marks[0])) / 1000
    ids = driver.execute_script("return Array.from(document.querySelectorAll('.card')).map(c => c.dataset.id)")
    csrf = driver.execute_script("return document.querySelector('meta[name=csrf-token]').content")
    url = driver.current_url.split("/heads/")[0]
    times = []
    for id_ in ids[:20]:
        req = urllib.request.Request(url + "/api/label", method="POST", headers={
            "content-type": "application/json", "x-csrf-token": csrf},
            data=json.dumps({"head": "clothing", "id": id_, "bucket": BUCKETS[0]}).encode())
        t = time.perf_counter()
        urllib.request.urlopen(req, timeout=60).read()
        times.append(time.perf_counter() - t)
    return {"one_by_one": one_by_one, "page": page, "request_ms": 1000 * statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--uncertain", type=int, default=1000)
    parser.add_argument("--labels", type=int, default=100)
    parser.add_argument("--model", choices=["tiny", "lite0"], default="tiny")
    parser.add_argument("--screenshot", type=Path, default=None, help="save the review queue as a PNG here")
    args = parser.parse_args()
    if not (args.shared / "data" / "clothing").is_dir():
        sys.exit(f"need {args.shared}/data/clothing")
    root = Path(tempfile.mkdtemp(prefix="hm-review-bench-"))
    ws = root / "workspace"
    proc = driver = None
    try:
        model = prepare(ws, args.shared, args.uncertain, args.model)
        proc, _, url = start_hmd(root, ws)
        driver = start_chromium(root / "chromium")
        driver.set_page_load_timeout(120)
        page = url + "heads/clothing"
        cold = load_page(driver, page)
        driver.execute_cdp_cmd("Network.clearBrowserCache", {})
        warm = load_page(driver, page)
        if args.screenshot:
            driver.set_window_size(1360, 900)
            driver.get(page)
            time.sleep(1.0)
            driver.save_screenshot(str(args.screenshot))
            with Image.open(args.screenshot) as shot:  # 256 colours: a third of the size, fine for a README
                shot.convert("RGB").quantize(256, dither=Image.Dither.FLOYDSTEINBERG).save(args.screenshot,
                                                                                            optimize=True)
            print(f"wrote {args.screenshot}")
        labelled = label(driver, ws, args.labels) if args.labels else None
        load = os.getloadavg()
        print()
        print(f"model {model}, {args.uncertain} uncertain images, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        for name, r in (("cold", cold), ("warm", warm)):
            print(f"page load ({name}): server answer {r['server_s']:.2f}s, DOM ready {r['dom_s']:.2f}s, "
                  f"first screen of {r['images']} thumbnails decoded {r['screen_s']:.2f}s")
        if labelled is not None:
            n = args.labels
            print(f"{n} keyboard labels, typed in bursts of ten: {labelled['page']:.2f}s in the page from the first "
                  f"key to the last label stored ({labelled['page'] / n * 1000:.0f} ms a label)")
            print(f"{n} keyboard labels, one WebDriver key press each: {labelled['one_by_one']:.2f}s until the last "
                  f"file was in its bucket ({labelled['one_by_one'] / n * 1000:.0f} ms a label)")
            print(f"one label request alone: {labelled['request_ms']:.0f} ms (median of 20)")
    finally:
        if driver is not None:
            driver.quit()
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=20)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
