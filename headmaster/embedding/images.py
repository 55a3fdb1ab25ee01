"""Reading image files into RGB pictures, and hashing file contents.

Every failure becomes an ImageError with a one-line reason; the caller skips the
file and counts it. Nothing here ever modifies or deletes a file.

Formats: whatever Pillow opens (AVIF through its own plugin), HEIC/HEIF through
pillow-heif, camera RAW through rawpy (the embedded full-size JPEG preview: what the
camera showed, and fast; a demosaic at half size when a file has none).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import threading
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from headmaster.workspace import RAW_EXTENSIONS

# Pillow's own bomb check judges the header, before draft() can shrink a JPEG: ours judges what decoding allocates
Image.MAX_IMAGE_PIXELS = None
MAX_IMAGE_PIXELS = 89_478_485  # decoded pixels per image unless [embedding] max_pixels says more (Pillow's default)
ImageFile.LOAD_TRUNCATED_IMAGES = False
PREVIEW_MIN_SIDE = 512  # a RAW preview smaller than this (some cameras keep a 160x120 one) loses to a demosaic
JPEG_SCALES = (1, 1 / 2, 1 / 4, 1 / 8)  # what libjpeg's DCT scaling (Image.draft) can do


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


# What a "cannot decode" verdict was found with: a new decoder may read what an older one could not
DECODER_VERSION = f"{_version('pillow')}+heif{_version('pillow-heif')}+raw{_version('rawpy')}"

HASH_CHUNK = 1 << 20


class ImageError(Exception):
    """The file cannot be used as an image; str(error) is the reason."""


class ImageUnavailable(ImageError):
    """The file could not be read just now (gone, no permission, out of memory): says nothing about its content."""


class ImageTooLarge(ImageUnavailable):
    """More pixels than the limit allows: a setting ([embedding] max_pixels), not a verdict on the content."""


_heif_lock = threading.Lock()
_heif_ready = False


def register_heif() -> None:
    """Teach Pillow HEIC/HEIF (pillow-heif), once per process; AVIF is Pillow's own."""
    global _heif_ready
    if _heif_ready:
        return
    with _heif_lock:
        if not _heif_ready:
            import pillow_heif

            pillow_heif.register_heif_opener()
            _heif_ready = True


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


def _check_pixels(size: tuple[int, int], limit: int, what: str) -> None:
    w, h = size
    if w * h > limit:
        raise ImageTooLarge(f"decompression bomb refused: {what} would decode to {w}x{h} = {w * h / 1e6:.0f} "
                            f"megapixels, over the limit of {limit / 1e6:.0f} ([embedding] max_pixels raises it)")


def _draft_jpeg(img: Image.Image, min_side: int | None, limit: int) -> None:
    """Ask libjpeg for the smallest DCT scale whose shorter side is still >= min_side, and small enough for
    `limit`: a 100-megapixel photo decodes at 1/8 scale (12 megapixels) in a tenth of the time."""
    w, h = img.size
    scale = 1.0
    if min_side:
        scale = max(min_side / min(w, h), 0.0)
    if w * h * scale * scale > limit:
        fitting = [k for k in JPEG_SCALES if w * h * k * k <= limit]
        scale = min(scale, fitting[0] if fitting else JPEG_SCALES[-1])
    if scale < 1:
        img.draft("RGB", (max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))))


def _open_pillow(path: Path | str, min_side: int | None, limit: int) -> Image.Image:
    with Image.open(path) as img:
        if img.format == "JPEG":
            _draft_jpeg(img, min_side, limit)
        _check_pixels(img.size, limit, img.format or "the image")
        img.load()
        return _to_rgb(ImageOps.exif_transpose(img))


# LibRaw's flip code -> the rotation that stands a preview upright (the demosaic applies it itself)
_RAW_FLIP = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.ROTATE_90, 6: Image.Transpose.ROTATE_270}


def _raw_preview(raw, min_side: int | None, limit: int) -> Image.Image | None:
    """The camera's embedded preview, upright, if it is big enough to stand in for the photo."""
    import rawpy

    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
        return None
    if thumb.format == rawpy.ThumbFormat.JPEG:
        img = Image.open(io.BytesIO(thumb.data))
        _draft_jpeg(img, min_side, limit)
        oriented = img.getexif().get(0x0112, 1) not in (0, 1)
    elif thumb.format == rawpy.ThumbFormat.BITMAP:
        img, oriented = Image.fromarray(thumb.data), False
    else:
        return None
    half_side = min(raw.sizes.width, raw.sizes.height) // 2  # what the demosaic fallback would give
    if min(img.size) < min(min_side or PREVIEW_MIN_SIDE, half_side):
        return None
    _check_pixels(img.size, limit, "the RAW preview")
    img.load()
    if oriented:
        img = ImageOps.exif_transpose(img)
    elif raw.sizes.flip in _RAW_FLIP:
        img = img.transpose(_RAW_FLIP[raw.sizes.flip])
    return _to_rgb(img)


def _open_raw(path: Path | str, min_side: int | None, limit: int) -> Image.Image:
    import rawpy

    try:
        with rawpy.imread(str(path)) as raw:
            img = _raw_preview(raw, min_side, limit)
            if img is None:
                _check_pixels((raw.sizes.width // 2, raw.sizes.height // 2), limit, "the RAW demosaic")
                img = Image.fromarray(raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8))
            return img
    except rawpy.LibRawFileUnsupportedError:
        raise ImageError("not a RAW file LibRaw can read") from None
    except rawpy.LibRawError as e:
        reason = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise ImageError(f"truncated or corrupt RAW file ({reason})") from None


def load_image(path: Path | str, min_side: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """Open, decode, apply EXIF orientation and convert to RGB.

    With `min_side`, JPEGs (and RAW files' JPEG previews) are decoded at a reduced scale
    (DCT scaling) whose shorter side is still at least `min_side`: much faster for photos,
    and the model's own resize happens afterwards, so quality is unchanged.
    The decompression-bomb guard judges the decoded size against `max_pixels`
    (default MAX_IMAGE_PIXELS): a JPEG over it decodes at a scale that fits.
    """
    limit = max_pixels or MAX_IMAGE_PIXELS
    try:
        if os.path.getsize(path) == 0:
            raise ImageError("empty file")
        if os.path.splitext(path)[1].lower() in RAW_EXTENSIONS:
            return _open_raw(path, min_side, limit)  # before Pillow, which opens a DNG as a TIFF of its preview
        register_heif()
        return _open_pillow(path, min_side, limit)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"decompression bomb refused: {e}") from None
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
