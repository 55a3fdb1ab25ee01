"""Reading image files into RGB pictures, and hashing file contents.

Every failure becomes an ImageError with a one-line reason; the caller skips the
file and counts it. Nothing here ever modifies or deletes a file.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Refuse decompression bombs outright instead of warning: a 1-gigapixel PNG would take the machine down.
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's default limit
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False

HASH_CHUNK = 1 << 20


class ImageError(Exception):
    """The file cannot be used as an image; str(error) is the reason."""


class ImageUnavailable(ImageError):
    """The file could not be read just now (gone, no permission, out of memory): says nothing about its content."""


def file_sha256(path: Path | str) -> str:
    """SHA-256 of the file's bytes, read in 1 MiB chunks so memory stays flat."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def load_image(path: Path | str, min_side: int | None = None) -> Image.Image:
    """Open, decode, apply EXIF orientation and convert to RGB.

    With `min_side`, JPEGs are decoded at a reduced scale (DCT scaling) whose
    shorter side is still at least `min_side`: much faster for photos, and the
    model's own resize happens afterwards, so quality is unchanged.
    """
    try:
        if os.path.getsize(path) == 0:
            raise ImageError("empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise ImageError(f"too many pixels ({img.width}x{img.height}): possible decompression bomb")
                if min_side and img.format == "JPEG":
                    w, h = img.size
                    scale = max(min_side / min(w, h), 0.0)
                    img.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"decompression bomb refused: {e}") from None
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except FileNotFoundError:
        raise ImageUnavailable("file vanished") from None
    except PermissionError:
        raise ImageUnavailable("permission denied") from None
    except MemoryError:
        raise ImageUnavailable("out of memory while decoding") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"truncated or corrupt image ({e})") from None
    except Exception as e:  # a decoder bug in Pillow must not take the run down
        raise ImageError(f"cannot decode ({type(e).__name__}: {e})") from None
