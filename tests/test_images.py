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


# -- formats people have: HEIC, AVIF, RAW; the bomb guard on the decoded size ---------------------------

def _oriented(path, fmt):
    """A 96x64 picture, blue band at the top-left, saved with EXIF orientation 6 (display rotated 90 cw)."""
    img = Image.new("RGB", (96, 64), (200, 30, 30))
    img.paste((30, 30, 200), (0, 0, 48, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, format=fmt, quality=90, exif=exif.tobytes())
    return path


@pytest.mark.parametrize("name, fmt", [("phone.HEIC", "HEIF"), ("web.avif", "AVIF"), ("rotated.jpg", "JPEG")])
def test_heic_avif_and_rotated_jpeg_read_upright(tmp_path, name, fmt):
    images.register_heif()  # pillow-heif writes the HEIC
    path = _oriented(tmp_path / name, fmt)
    before = path.read_bytes()
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (64, 96)  # stood upright
    r, g, b = np.asarray(out)[5, 58]  # the blue band, now along the top right
    assert b > 150 and r < 100
    assert path.read_bytes() == before


def test_raw_embedded_preview_then_demosaic(tmp_path):
    from dng import make_dng

    with_preview = make_dng(tmp_path / "cam.dng", "jpeg", preview_size=(40, 32))
    out = load_image(with_preview)
    assert out.size == (40, 32)  # the camera's preview, not the 64x64 sensor
    left, right = np.asarray(out)[16, 2], np.asarray(out)[16, 37]
    assert left[0] > 200 and right[2] > 200  # red on the left, blue on the right, as the camera showed
    assert load_image(make_dng(tmp_path / "bitmap.dng", "rgb")).size == (32, 32)

    bare = make_dng(tmp_path / "bare.DNG", None)  # no preview: demosaiced at half size
    out = load_image(bare)
    assert out.size == (32, 32)
    assert np.asarray(out)[16, 1][0] > np.asarray(out)[16, 1][2] and np.asarray(out)[16, 30][2] > np.asarray(out)[16, 30][0]


@pytest.mark.parametrize("content, reason", [(b"not a camera file", r"truncated or corrupt RAW file \(Input/output"),
                                             (bytes(range(256)) * 16, "not a RAW file LibRaw can read")])
def test_raw_that_is_not_raw_is_one_clear_reason(tmp_path, content, reason):
    path = tmp_path / "fake.NEF"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason):
        load_image(path)


def test_bomb_guard_judges_the_decoded_size(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100_000)
    big = _save(Image.new("RGB", (1600, 1200), (90, 90, 90)), tmp_path / "big.jpg")  # 1.9 MP > the limit
    out = load_image(big)
    assert out.size == (200, 150)  # decoded at 1/8 scale: fits, not refused
    assert load_image(big, min_side=100).size == (200, 150)
    png = _save(Image.new("RGB", (1600, 1200), (90, 90, 90)), tmp_path / "big.png")  # no reduced decode for PNG
    with pytest.raises(images.ImageTooLarge, match=r"1600x1200 = 2 megapixels, over the limit.*max_pixels"):
        load_image(png)
    assert load_image(png, max_pixels=2_000_000).size == (1600, 1200)  # [embedding] max_pixels raised


def test_new_formats_count_as_images():
    from headmaster.workspace import is_image_name

    assert all(is_image_name(n) for n in ("a.HEIC", "a.heif", "a.avif", "a.CR3", "a.nef", "a.dng", "a.RW2"))
    assert not is_image_name("a.jpg.xmp") and not is_image_name(".hidden.heic")
