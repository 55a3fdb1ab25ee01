"""Screenshots of the review page (overview, queue, suspects) at phone and desktop width, in a real headless Chromium.

    uv run python bench/review_screenshots.py [--shared ../shared] [--out docs]

A demo-like workspace in a temporary folder: `hm demo`'s photos as heads/clothing/, its held-back photos and
(from ../shared, when there) three dresses, a class the head has no bucket for, in classified/clothing/uncertain/,
and one shoe filed as a hat so the Suspects tab has something to show. The model is a tiny random CLIP
(tests/helpers.py), so the scores mean nothing; the layout is what the pictures are for. Writes
docs/review-{overview,queue,suspects}-{375,1360}.png.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests")]  # helpers.build_clip, browser.start_chromium

PAGES = {"overview": "", "queue": "heads/clothing", "suspects": "heads/clothing/suspects"}
WIDTHS = (375, 1360)


def make_workspace(root: Path, shared: Path) -> Path:
    from helpers import build_clip

    from headmaster.embedding import Context, EmbedOptions, add_model
    from headmaster.heads import TrainConfig, lay_out, train_one

    layout = lay_out(root)
    uncertain = root / "classified" / "clothing" / "uncertain"
    uncertain.mkdir(parents=True)
    for photo in sorted((root / "unsorted").glob("*.jpg"))[:14]:
        shutil.move(photo, uncertain / photo.name)
    dresses = shared / "data" / "clothing" / "validation" / "dress"
    for photo in sorted(dresses.glob("*.jpg"))[:3] if dresses.is_dir() else []:
        shutil.copyfile(photo, uncertain / f"dress-{photo.name}")
    shoe = sorted((root / "heads" / "clothing" / "shoes").glob("*.jpg"))[0]
    shutil.move(shoe, root / "heads" / "clothing" / "hat" / shoe.name)  # a label error for the Suspects tab
    model = build_clip(Path(tempfile.mkdtemp(prefix="hm-shots-clip-")))
    with Context.open(str(root), EmbedOptions(device="cpu", progress=False)) as c:
        add_model(c.store, "tiny-clip", str(model), 24)
        train_one(c, "clothing", TrainConfig(epochs=20))
    return layout.root


def full_page(driver, width: int, path: Path) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 600})
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": min(height, 4000), "deviceScaleFactor": 1, "mobile": width < 600})
    driver.save_screenshot(str(path))
    from PIL import Image

    with Image.open(path) as im:  # 256 colours: a fifth of the bytes, the same picture for docs/
        small = im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)

    from browser import start_chromium

    from headmaster.daemon import LocalWorker
    from headmaster.embedding import EmbedOptions
    from headmaster.web import ReviewService, WebServer
    from headmaster.workspace import Workspace

    root = make_workspace(Path(tempfile.mkdtemp(prefix="hm-shots-")) / "workspace", args.shared)
    ws = Workspace(root)
    models = LocalWorker(ws, EmbedOptions(device="cpu", progress=False))
    service = ReviewService(ws, models.call)
    server = WebServer(service, "127.0.0.1:0")
    url = server.start()
    driver = start_chromium()
    try:
        for name, path in PAGES.items():
            for width in WIDTHS:
                driver.get(url + path)
                driver.execute_script("return new Promise(r => setTimeout(r, 400))")  # thumbnails, the first poll
                out = args.out / f"review-{name}-{width}.png"
                full_page(driver, width, out)
                print(out.relative_to(REPO) if out.is_relative_to(REPO) else out)
    finally:
        driver.quit()
        server.stop()
        service.close()
        models.close()


if __name__ == "__main__":
    main()
