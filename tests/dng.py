"""Tiny, real DNG files that rawpy (LibRaw) opens: RAW tests need no camera files.

    make_dng(path, preview="jpeg" | "rgb" | None, width=64, height=64)

Laid out like a camera's DNG:
  preview="jpeg": IFD0 = an 8-bit JPEG preview (NewSubfileType=1) + the DNG tags, SubIFD = the 16-bit Bayer raw
  preview="rgb" : IFD0 = an 8-bit uncompressed RGB preview
  preview=None  : IFD0 = the Bayer raw itself; rawpy's extract_thumb raises, postprocess() demosaics
A hand-rolled little-endian TIFF writer (numpy + Pillow for the JPEG), because tifffile will not write
Compression=7 strips without imagecodecs. `exiftool -validate` says OK for all three.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

BLACK, WHITE = 64, 4095  # 12-bit sensor, black level 64
BYTE, ASCII, SHORT, LONG, RATIONAL, SRATIONAL = 1, 2, 3, 4, 5, 10
_FMT = {BYTE: "B", ASCII: "B", SHORT: "H", LONG: "I", RATIONAL: "I", SRATIONAL: "i"}


def bayer_rggb(width: int, height: int, colour: tuple[int, int, int] | None = None) -> np.ndarray:
    """RGGB mosaic of `colour`, or of a gradient (red on the left, blue on the right)."""
    x = np.linspace(0.0, 1.0, width)[None, :].repeat(height, 0)
    if colour is None:
        r, g, b = 1 - x, np.full_like(x, 0.4), x
    else:
        r, g, b = (np.full_like(x, c / 255) for c in colour)
    raw = np.empty((height, width))
    raw[0::2, 0::2] = r[0::2, 0::2]
    raw[0::2, 1::2] = g[0::2, 1::2]
    raw[1::2, 0::2] = g[1::2, 0::2]
    raw[1::2, 1::2] = b[1::2, 1::2]
    return (BLACK + raw * (WHITE - BLACK)).astype("<u2")


def preview_rgb(width: int, height: int, colour: tuple[int, int, int] | None = None) -> np.ndarray:
    if colour is not None:
        return np.tile(np.array(colour, dtype=np.uint8), (height, width, 1))
    x = np.linspace(0, 255, width).astype(np.uint8)[None, :].repeat(height, 0)
    return np.stack([255 - x, np.full_like(x, 100), x], axis=-1)


def _rat(values, signed=False):
    out = []
    for v in values:
        out += [int(round(v * 10000)), 10000]
    return out


class _Tiff:
    """Minimal little-endian classic-TIFF builder: blobs and IFDs appended to one buffer."""

    def __init__(self):
        self.buf = bytearray(b"II*\x00\x00\x00\x00\x00")  # IFD0 offset patched later

    def blob(self, data: bytes) -> int:
        if len(self.buf) % 2:
            self.buf += b"\x00"
        off = len(self.buf)
        self.buf += data
        return off

    def ifd(self, entries: list[tuple[int, int, list | bytes | str]]) -> int:
        """entries: (tag, type, values). Returns the IFD offset. next-IFD = 0."""
        entries = sorted(entries)
        packed = []
        for tag, typ, vals in entries:
            if typ == ASCII:
                raw = (vals.encode("ascii") if isinstance(vals, str) else vals) + b"\x00"
                count = len(raw)
            else:
                count = len(vals) // 2 if typ in (RATIONAL, SRATIONAL) else len(vals)
                raw = struct.pack("<%d%s" % (len(vals), _FMT[typ]), *vals)
            if len(raw) <= 4:
                packed.append(struct.pack("<HHI", tag, typ, count) + raw.ljust(4, b"\x00"))
            else:
                packed.append((tag, typ, count, raw))
        # lay out: IFD first, then its out-of-line values
        if len(self.buf) % 2:
            self.buf += b"\x00"
        ifd_off = len(self.buf)
        ifd_size = 2 + 12 * len(packed) + 4
        self.buf += b"\x00" * ifd_size
        body = bytearray(struct.pack("<H", len(packed)))
        for p in packed:
            if isinstance(p, bytes):
                body += p
            else:
                tag, typ, count, raw = p
                body += struct.pack("<HHII", tag, typ, count, self.blob(raw))
        body += b"\x00\x00\x00\x00"
        self.buf[ifd_off:ifd_off + ifd_size] = body
        return ifd_off

    def set_first_ifd(self, off: int):
        self.buf[4:8] = struct.pack("<I", off)


def _dng_tags(model: str):
    # XYZ(D65) -> camera matrix; for this synthetic "camera" use XYZ->linear sRGB.
    cm = [3.2406, -1.5372, -0.4986, -0.9689, 1.8758, 0.0415, 0.0557, -0.2040, 1.0570]
    return [
        (271, ASCII, "Headmaster"),                  # Make
        (272, ASCII, model),                         # Model
        (274, SHORT, [1]),                           # Orientation
        (50706, BYTE, [1, 4, 0, 0]),                 # DNGVersion
        (50707, BYTE, [1, 1, 0, 0]),                 # DNGBackwardVersion
        (50708, ASCII, model),                       # UniqueCameraModel
        (50721, SRATIONAL, _rat(cm)),                # ColorMatrix1
        (50728, RATIONAL, _rat([1, 1, 1])),          # AsShotNeutral
        (50778, SHORT, [21]),                        # CalibrationIlluminant1 = D65
    ]


def _raw_tags(t: _Tiff, raw: np.ndarray, subfile: int):
    h, w = raw.shape
    off = t.blob(raw.astype("<u2").tobytes())
    return [
        (254, LONG, [subfile]),                      # NewSubfileType: 0 = main image
        (256, LONG, [w]), (257, LONG, [h]),
        (258, SHORT, [16]), (259, SHORT, [1]),       # 16 bit, uncompressed
        (262, SHORT, [32803]),                       # PhotometricInterpretation = CFA
        (273, LONG, [off]), (277, SHORT, [1]), (278, LONG, [h]), (279, LONG, [raw.nbytes]),
        (284, SHORT, [1]),
        (33421, SHORT, [2, 2]),                      # CFARepeatPatternDim
        (33422, BYTE, [0, 1, 1, 2]),                 # CFAPattern = RGGB
        (50710, BYTE, [0, 1, 2]),                    # CFAPlaneColor
        (50711, SHORT, [1]),                         # CFALayout
        (50714, LONG, [BLACK]), (50717, LONG, [WHITE]),  # BlackLevel, WhiteLevel
    ]


def make_dng(path, preview: str | None = "jpeg", width: int = 64, height: int = 64,
             preview_size: tuple[int, int] = (32, 32), model: str = "Headmaster Test Camera",
             colour: tuple[int, int, int] | None = None) -> Path:
    """Write a DNG; `colour` fills the raw and the preview (default: a red-to-blue gradient)."""
    t = _Tiff()
    raw = bayer_rggb(width, height, colour)
    if preview is None:
        t.set_first_ifd(t.ifd(_raw_tags(t, raw, 0) + _dng_tags(model)))
    else:
        sub = t.ifd(_raw_tags(t, raw, 0))
        pw, ph = preview_size
        rgb = preview_rgb(pw, ph, colour)
        if preview == "jpeg":
            b = io.BytesIO()
            Image.fromarray(rgb, "RGB").save(b, "JPEG", quality=90)
            data, comp, photometric = b.getvalue(), 7, 6   # JPEG, YCbCr
        elif preview == "rgb":
            data, comp, photometric = rgb.tobytes(), 1, 2  # uncompressed RGB
        else:
            raise ValueError(preview)
        off = t.blob(data)
        ifd0 = [
            (254, LONG, [1]),                        # reduced-resolution preview
            (256, LONG, [pw]), (257, LONG, [ph]), (258, SHORT, [8, 8, 8]),
            (259, SHORT, [comp]), (262, SHORT, [photometric]),
            (273, LONG, [off]), (277, SHORT, [3]), (278, LONG, [ph]), (279, LONG, [len(data)]),
            (284, SHORT, [1]),
            (330, LONG, [sub]),                      # SubIFDs -> the raw
        ] + _dng_tags(model)
        t.set_first_ifd(t.ifd(ifd0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(bytes(t.buf))
    return Path(path)
