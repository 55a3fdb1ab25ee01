"""Thumbnails, and the full-size view of formats browsers cannot show: JPEGs made once per image content
and kept on disk by content hash.

Images are read by the embedding wing's load_image, so every format headmaster reads has a
thumbnail (HEIC, AVIF, RAW through its preview); JPEGs are decoded at reduced size (Pillow's
`draft` asks libjpeg for a 1/2..1/8 scale DCT), which is most of the speed on camera photos;
EXIF orientation is applied so a portrait photo stands upright. A thumbnail is written through a temp file and renamed, so a
half-written one is never served.

The full-size view serves JPEG, PNG, WebP, GIF and BMP files as they are (BROWSER_TYPES: every browser
shows those); HEIC/HEIF, AVIF, TIFF and camera RAW, which browsers show only in part or not at all,
are served as a JPEG rendered from the decoded image (`cached_rendering`: the same decoding, so RAW
files show their embedded preview), at most FULL_SIZE pixels on the longest side. The original file
is only ever read.
"""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

from PIL import Image

from headmaster.embedding import ImageError, load_image

SIZE = 320  # longest side, in pixels: sharp at 160 CSS pixels on a 2x screen
QUALITY = 82
THUMBS_DIR = ".thumbs"  # inside the workspace; hidden, so no scan takes it for a head or a bucket
FULL_SIZE = 4096  # longest side of a rendered full-size view: a 4K screen; a phone's 12-megapixel HEIC whole
FULL_QUALITY = 90
# the image types every browser shows as they are; every other format headmaster reads is rendered
BROWSER_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
                 ".gif": "image/gif", ".bmp": "image/bmp"}


class ThumbnailError(Exception):
    """The file cannot be read as an image."""


def thumbnail_path(cache: Path, hash_: str, size: int = SIZE) -> Path:
    return cache / hash_[:2] / f"{hash_}-{size}.jpg"


def make_thumbnail(source: Path, size: int = SIZE, quality: int = QUALITY) -> bytes:
    """A JPEG of `source` whose longest side is at most `size`, upright."""
    what = "a thumbnail of" if size <= SIZE else "a JPEG view of"
    try:
        im = load_image(source, min_side=size)  # RGB, upright, JPEGs decoded at the smallest DCT scale >= size
    except ImageError as e:
        raise ThumbnailError(f"cannot make {what} {source.name}: {e}") from None
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=quality, optimize=True)
    return out.getvalue()


def browser_type(source: Path) -> str | None:
    """The media type to serve `source` as it is, or None: render it (cached_rendering)."""
    return BROWSER_TYPES.get(source.suffix.lower())


def cached_rendering(cache: Path, hash_: str, source: Path) -> Path:
    """The full-size view of a file browsers cannot show: a JPEG of its decoded image, made once per content."""
    return cached_thumbnail(cache, hash_, source, FULL_SIZE, FULL_QUALITY)


def cached_thumbnail(cache: Path, hash_: str, source: Path, size: int = SIZE, quality: int = QUALITY) -> Path:
    """The thumbnail file for this content, made now if it is not on disk yet."""
    path = thumbnail_path(cache, hash_, size)
    if path.is_file():
        return path
    data = make_thumbnail(source, size, quality)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{uuid.uuid4().hex}"
    tmp.write_bytes(data)
    os.replace(tmp, path)  # same content under the same name: a race between two requests is harmless
    return path
