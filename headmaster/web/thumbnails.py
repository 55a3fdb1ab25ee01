"""Thumbnails: small JPEGs made once per image content and kept on disk by content hash.

Images are read by the embedding wing's load_image, so every format headmaster reads has a
thumbnail (HEIC, AVIF, RAW through its preview); JPEGs are decoded at reduced size (Pillow's
`draft` asks libjpeg for a 1/2..1/8 scale DCT), which is most of the speed on camera photos;
EXIF orientation is applied so a portrait photo stands upright. A thumbnail is written through a temp file and renamed, so a
half-written one is never served.
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


class ThumbnailError(Exception):
    """The file cannot be read as an image."""


def thumbnail_path(cache: Path, hash_: str, size: int = SIZE) -> Path:
    return cache / hash_[:2] / f"{hash_}-{size}.jpg"


def make_thumbnail(source: Path, size: int = SIZE) -> bytes:
    """A JPEG of `source` whose longest side is at most `size`, upright."""
    try:
        im = load_image(source, min_side=size)  # RGB, upright, JPEGs decoded at the smallest DCT scale >= size
    except ImageError as e:
        raise ThumbnailError(f"cannot make a thumbnail of {source.name}: {e}") from None
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=QUALITY, optimize=True)
    return out.getvalue()


def cached_thumbnail(cache: Path, hash_: str, source: Path, size: int = SIZE) -> Path:
    """The thumbnail file for this content, made now if it is not on disk yet."""
    path = thumbnail_path(cache, hash_, size)
    if path.is_file():
        return path
    data = make_thumbnail(source, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{uuid.uuid4().hex}"
    tmp.write_bytes(data)
    os.replace(tmp, path)  # same content under the same name: a race between two requests is harmless
    return path
