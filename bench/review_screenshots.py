"""Screenshots of the review page (overview, queue, suspects, a library's queue) at phone and desktop width, in a
real headless Chromium.

    uv run python bench/review_screenshots.py [--shared ../shared] [--out docs] [--pages library,...]

A demo-like workspace in a temporary folder: `hm demo`'s photos as heads/clothing/, its held-back photos and
(from ../shared, when there) three dresses, a class the head has no bucket for, in classified/clothing/uncertain/,
and one shoe filed as a hat so the Suspects tab has something to show. The model is a tiny random CLIP
(tests/helpers.py), so the scores mean nothing; the layout is what the pictures are for. Beside the workspace,
a photo library `Photos/` of nested year and trip folders (validation photos from ../shared, a few of them as
HEIC; else the demo's held-back photos), tagged with `hm tag`'s library function so its vectors are cached,
is the page's [[library]]. Writes docs/review-{overview,queue,suspects,library}-{375,1360}.png.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests")]  # helpers.build_clip, browser.start_chromium

PAGES = {"overview": "", "queue": "heads/clothing", "suspects": "heads/clothing/suspects",
         "library": "heads/clothing/library/Photos"}
WIDTHS = (375, 1360)


def make_library(library: Path, shared: Path, unsorted: list[Path]) -> None:
    """Photos/2023/..., Photos/2024/trip/...: a few photos of each class, every fourth one as an iPhone's HEIC."""
    from PIL import Image

    from headmaster.embedding.images import register_heif

    register_heif()
    validation = shared / "data" / "clothing" / "validation"
    found = [p for c in sorted(validation.iterdir()) if c.is_dir() for p in sorted(c.glob("*.jpg"))[:3]] \
        if validation.is_dir() else unsorted
    for i, photo in enumerate(found):
        folder = library / ("2023" if i % 3 == 0 else "2024/trip" if i % 3 == 1 else "2024/home")
        folder.mkdir(parents=True, exist_ok=True)
        if i % 4 == 0:
            with Image.open(photo) as im:
                im.convert("RGB").save(folder / f"IMG_{1000 + i}.HEIC", format="HEIF", quality=80)
        else:
            shutil.copyfile(photo, folder / f"IMG_{1000 + i}.jpg")


def make_workspace(root: Path, shared: Path) -> Path:
    from helpers import build_clip

    from headmaster.curation import tag_library
    from headmaster.embedding import Context, EmbedOptions, add_model
    from headmaster.heads import TrainConfig, lay_out, train_one

    layout = lay_out(root)
    uncertain = root / "classified" / "clothing" / "uncertain"
    uncertain.mkdir(parents=True)
    for photo in sorted((root / "unsorted").glob("*.jpg"))[:14]:
        shutil.move(photo, uncertain / photo.name)
    make_library(root.parent / "Photos", shared, sorted((root / "unsorted").glob("*.jpg")))
    dresses = shared / "data" / "clothing" / "validation" / "dress"
    for photo in sorted(dresses.glob("*.jpg"))[:3] if dresses.is_dir() else []:
        shutil.copyfile(photo, uncertain / f"dress-{photo.name}")
    shoe = sorted((root / "heads" / "clothing" / "shoes").glob("*.jpg"))[0]
    shutil.move(shoe, root / "heads" / "clothing" / "hat" / shoe.name)  # a label error for the Suspects tab
    model = build_clip(Path(tempfile.mkdtemp(prefix="hm-shots-clip-")))
    with Context.open(str(root), EmbedOptions(device="cpu", progress=False)) as c:
        add_model(c.store, "tiny-clip", str(model), 24)
        train_one(c, "clothing", TrainConfig(epochs=20))
        tag_library(c, [root.parent / "Photos"], ["clothing"])  # the library's vectors, cached as hmd would
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
    parser.add_argument("--pages", default=",".join(PAGES), help=f"which pages, comma-separated ({', '.join(PAGES)})")
    args = parser.parse_args(argv)
    pages = {name: PAGES[name] for name in args.pages.split(",")}

    from browser import start_chromium

    from headmaster.config import LibraryConfig
    from headmaster.daemon import LocalWorker
    from headmaster.embedding import EmbedOptions
    from headmaster.web import ReviewService, WebServer
    from headmaster.workspace import Workspace

    root = make_workspace(Path(tempfile.mkdtemp(prefix="hm-shots-")) / "workspace", args.shared)
    ws = Workspace(root)
    models = LocalWorker(ws, EmbedOptions(device="cpu", progress=False))
    service = ReviewService(ws, models.call, libraries=[LibraryConfig(path=str(root.parent / "Photos"))])
    server = WebServer(service, "127.0.0.1:0")
    url = server.start()
    driver = start_chromium()
    try:
        for name, path in pages.items():
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
