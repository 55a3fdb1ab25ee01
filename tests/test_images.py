import io

import numpy as np
import pytest
from PIL import Image

from headmaster.embedding import ImageError, images, load_image


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = _save(img, tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_image(path).size == (20, 40)


@pytest.mark.parametrize("mode", ["CMYK", "P", "L", "LA", "RGBA", "I;16", "1"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    base = Image.new("RGB", (16, 16), (10, 200, 30))
    if mode == "I;16":
        img = Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16))
        path = _save(img, tmp_path / "deep.png")
    elif mode == "CMYK":
        path = _save(base.convert("CMYK"), tmp_path / "cmyk.jpg")
    else:
        path = _save(base.convert(mode), tmp_path / f"m{len(mode)}.png")
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (16, 16)
    if mode == "I;16":
        assert 150 < np.asarray(out)[0, 0, 0] < 160  # 40000/65535 of full scale


def test_transparent_pixels_composited_on_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    out = load_image(_save(img, tmp_path / "clear.png"))
    assert np.asarray(out).min() == 255


@pytest.mark.parametrize("kind, reason", [
    ("empty", "empty file"),
    ("text", "not an image"),
    ("truncated", "truncated or corrupt"),
    ("bomb", "decompression bomb"),
])
def test_bad_files_raise_with_reason_and_stay(tmp_path, monkeypatch, kind, reason):
    path = tmp_path / f"{kind}.png"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("hello, not a picture")
    elif kind == "truncated":
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    else:
        monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
        Image.new("RGB", (64, 64)).save(path)
    before = path.read_bytes()
    with pytest.raises(ImageError, match=reason):
        load_image(path)
    assert path.read_bytes() == before


def test_reduced_jpeg_decode_keeps_min_side(tmp_path):
    path = _save(Image.new("RGB", (1600, 1200), (90, 90, 90)), tmp_path / "big.jpg")
    small = load_image(path, min_side=224)
    assert min(small.size) >= 224 and small.size[0] < 1600
    assert load_image(path).size == (1600, 1200)
