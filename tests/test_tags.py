"""hm tag: the tag rule, XMP sidecars merged (read back by exiftool), a nested library of every format.

One workspace with two trained heads is shared by the module: warm (binary: positive = red and
yellow, negative = blue and green) and hue (multi-class: red, blue, green, yellow). Every test tags
its own folder of photos.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from dng import make_dng
from helpers import COLOURS, colour_image, fill_bucket
from PIL import Image

from headmaster import HeadmasterError
from headmaster.cli import cli
from headmaster.curation import (TagOptions, find_images, forget_gone, forget_tag_records, nearest_the_cut, tag_images,
                                 tag_library, tagged_images)
from headmaster.curation.xmp import HeadRecord, SidecarError, merge_sidecar
from headmaster.embedding import Context, EmbedOptions, add_model
from headmaster.embedding.images import register_heif
from headmaster.heads import (HeadRules, TrainConfig, checkpoint_version, cut_margin, decide_with_cut, positive_bucket,
                              read_checkpoint_meta, tag_for, train_one)

FAST = TrainConfig(epochs=30)
EXIFTOOL = shutil.which("exiftool")
# in CI (.ci/run installs it) a missing exiftool fails the test instead of skipping it
needs_exiftool = pytest.mark.skipif(EXIFTOOL is None and not os.environ.get("CI"),
                                    reason="exiftool (libimage-exiftool-perl) is not installed")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, clip_path):
    ws = tmp_path_factory.mktemp("tag") / "workspace"
    heads = ws / "heads"
    for colour, seed in (("red", 0), ("yellow", 100), ("blue", 200), ("green", 300)):
        fill_bucket(heads / "hue" / colour, colour, 8, seed)
        fill_bucket(heads / "warm" / ("positive" if colour in ("red", "yellow") else "negative"), colour, 8, seed)
    with Context.open(str(ws), EmbedOptions(device="cpu", progress=False)) as c:
        add_model(c.store, "tiny-clip", str(clip_path), 24)
        for head in ("warm", "hue"):
            train_one(c, head, FAST)
        yield c


def hm(ctx: Context, *args: str):
    return CliRunner().invoke(cli, ["--workspace", str(ctx.workspace.root), "--no-progress", *args])


def exiftool(path: Path) -> dict:
    out = subprocess.run([EXIFTOOL, "-j", "-G1", "-a", "-struct", str(path)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)[0]


def as_list(value) -> list:
    return value if isinstance(value, list) else [] if value is None else [value]


def hashes(root: Path) -> dict[str, str]:
    """Every image below `root` (links not followed) -> the SHA-256 of its bytes."""
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            p = Path(folder, f)
            if not f.endswith((".xmp", ".txt", ".json")) and not p.is_symlink():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# -- the rule --------------------------------------------------------------------------------------

def rules(classes: list[str], threshold: float | None = None) -> HeadRules:
    return HeadRules({"type": "binary" if len(classes) == 2 else "multiclass", "classes": classes,
                      "threshold": threshold})


def test_positive_bucket_by_name_else_the_sorted_rule():
    assert positive_bucket(["negative", "positive"])[0] == "positive"
    assert positive_bucket(["No", "Yes"])[0] == "Yes"
    assert positive_bucket(["0", "1"]) == ("1", "the bucket named 1")
    assert positive_bucket(["positive", "tagged"])[0] == "positive"  # by name, though it sorts first
    bucket, why = positive_bucket(["blurry", "sharp"])
    assert bucket == "sharp" and "second of the sorted buckets" in why


def test_tags_binary_is_the_head_multiclass_the_bucket_uncertain_nothing():
    binary, multi = rules(["negative", "positive"]), rules(["cap", "hat", "none"])
    assert tag_for("nsfw", binary, "positive").hierarchical == "headmaster|nsfw"
    assert tag_for("nsfw", binary, "negative") is None
    assert tag_for("nsfw", binary, "uncertain") is None
    hat = tag_for("clothing", multi, "hat")
    assert (hat.keyword, hat.hierarchical, hat.tags_list) == \
        ("hat", "headmaster|clothing|hat", "headmaster/clothing/hat")
    assert tag_for("clothing", multi, "uncertain") is None


def test_run_time_cut_on_the_positive_bucket():
    head = rules(["positive", "tagged"], threshold=0.5)  # the head scores 'tagged'; positive is classes[0]
    probs = {"positive": 0.3, "tagged": 0.7}
    assert decide_with_cut(head, probs, "tagged", 0.7) == ("tagged", 0.7)  # no cut: the head's own decision
    assert decide_with_cut(head, probs, "tagged", 0.7, cut=0.25) == ("positive", 0.3)
    assert decide_with_cut(head, probs, "tagged", 0.7, cut=0.35) == ("tagged", 0.3)
    assert cut_margin(head, probs) == pytest.approx(0.2)  # |0.3 - (1 - 0.5)|
    multi = rules(["a", "b", "c"])
    assert decide_with_cut(multi, {"a": 0.5, "b": 0.3, "c": 0.2}, "a", 0.5, cut=0.6) == ("uncertain", 0.5)
    assert cut_margin(multi, {"a": 0.5, "b": 0.3, "c": 0.2}) == pytest.approx(0.2)


def test_status_says_which_bucket_is_positive(trained):
    r = hm(trained, "status", "--head", "warm")
    assert r.exit_code == 0, r.output
    assert "Tag: 'warm' when positive wins (positive bucket: the bucket named positive)" in r.stdout
    r = hm(trained, "status", "--head", "hue")
    assert "Tags: headmaster|hue|<bucket>" in r.stdout


# -- XMP -------------------------------------------------------------------------------------------

def test_merge_replaces_only_our_heads(tmp_path):
    first = merge_sidecar(None, [HeadRecord("clothing", "hat", ("clothing", "hat"), "m", 0.9, "2025-01-01"),
                                 HeadRecord("nsfw", "positive", ("nsfw",), "m", 0.8, "2025-01-01")])
    second = merge_sidecar(first, [HeadRecord("clothing", "cap", ("clothing", "cap"), "m", 0.7, "2025-02-01")])
    text = second.decode()
    assert "headmaster|clothing|cap" in text and "headmaster|clothing|hat" not in text
    assert "headmaster|nsfw" in text  # a head not in this run keeps its tag
    assert merge_sidecar(second, [HeadRecord("clothing", "cap", ("clothing", "cap"), "m", 0.7, "2025-02-01")]) == second
    for bad in (b"<x:xmpmeta", b"\x00\x01garbage", b"<a>not xmp</a>"):
        with pytest.raises(SidecarError):
            merge_sidecar(bad, [])


@needs_exiftool
def test_exiftool_sidecar_keeps_everything_over_two_runs(trained, tmp_path):
    """A sidecar made by exiftool (title, rating, the user's keywords) keeps them all; our tags follow the runs."""
    lib = tmp_path / "lib"
    photo = colour_image(lib / "trip" / "red.jpg", "red", 900, fmt="JPEG")
    sidecar = photo.with_name("red.jpg.xmp")
    subprocess.run([EXIFTOOL, "-q", "-o", str(sidecar), "-XMP-dc:Title=My title", "-XMP-xmp:Rating=4",
                    "-XMP-dc:Subject=mine", "-XMP-dc:Subject=warm-ish", "-XMP-lr:HierarchicalSubject=places|beach",
                    "-XMP-digiKam:TagsList=places/beach", "-XMP-photoshop:City=Lisbon"], check=True)
    before = hashes(lib)

    r = hm(trained, "tag", str(lib), "--threshold", "warm=0")  # everything is warm
    assert r.exit_code == 0, r.output
    data = exiftool(sidecar)
    assert data["XMP-dc:Title"] == "My title" and data["XMP-xmp:Rating"] == 4 and data["XMP-photoshop:City"] == "Lisbon"
    assert as_list(data["XMP-dc:Subject"])[:2] == ["mine", "warm-ish"] and "warm" in data["XMP-dc:Subject"]
    assert "red" in data["XMP-dc:Subject"]
    assert set(as_list(data["XMP-lr:HierarchicalSubject"])) == {"places|beach", "headmaster|warm", "headmaster|hue|red"}
    assert set(as_list(data["XMP-digiKam:TagsList"])) == {"places/beach", "headmaster/warm", "headmaster/hue/red"}
    heads = {h["Head"]: h for h in data["XMP-headmaster:Heads"]}
    assert heads["warm"]["Model"] == "tiny-clip" and heads["warm"]["Bucket"] == "positive"
    assert str(heads["hue"]["Checkpoint"])[:4].isdigit() and 0 <= float(heads["hue"]["Score"]) <= 1

    r = hm(trained, "tag", str(lib), "--heads", "warm", "--threshold", "1")  # a different outcome: never warm
    assert r.exit_code == 0, r.output
    data = exiftool(sidecar)
    assert as_list(data["XMP-dc:Subject"]) == ["mine", "warm-ish", "red"]  # ours went, the user's stayed
    assert set(as_list(data["XMP-lr:HierarchicalSubject"])) == {"places|beach", "headmaster|hue|red"}
    assert data["XMP-dc:Title"] == "My title" and data["XMP-xmp:Rating"] == 4 and data["XMP-photoshop:City"] == "Lisbon"
    assert hashes(lib) == before  # the photo's bytes never change


# -- a library as people have one ------------------------------------------------------------------

def _oriented_jpeg(path: Path) -> Path:
    img = Image.new("RGB", (48, 32), COLOURS["red"])
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, "JPEG", quality=90, exif=exif.tobytes())
    return path


@pytest.fixture
def library(tmp_path) -> Path:
    lib = tmp_path / "Pictures"
    register_heif()
    (lib / "2024" / "iphone").mkdir(parents=True)
    Image.new("RGB", (48, 40), COLOURS["red"]).save(lib / "2024" / "iphone" / "IMG_0001.HEIC", format="HEIF")
    Image.new("RGB", (48, 40), COLOURS["blue"]).save(lib / "2024" / "web.avif", format="AVIF")
    make_dng(lib / "2024" / "camera" / "DSC_0001.dng", "jpeg", colour=COLOURS["red"])
    make_dng(lib / "2024" / "camera" / "DSC_0002.DNG", None, colour=COLOURS["blue"])
    _oriented_jpeg(lib / "rotated.jpg")
    colour_image(lib / "2023" / "deep" / "er" / "blue.png", "blue", 1)
    colour_image(lib / ".hidden" / "secret.jpg", "red", 2, fmt="JPEG")
    colour_image(lib / ".dotfile.jpg", "red", 3, fmt="JPEG")
    os.symlink(lib, lib / "2023" / "loop")  # a symlink loop: never followed
    colour_image(lib / "2023" / "broken.jpg", "red", 4, fmt="JPEG")
    (lib / "2023" / "broken.jpg.xmp").write_bytes(b"<?xml version='1.0'?><x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF")
    colour_image(lib / "2023" / "blocked.jpg", "red", 5, fmt="JPEG")
    (lib / "2023" / "blocked.jpg.xmp").mkdir()  # something in the way of the sidecar
    return lib


def test_nested_library_every_format(trained, library):
    before = hashes(library)
    broken = (library / "2023" / "broken.jpg.xmp").read_bytes()
    report = tag_library(trained, [library], options=TagOptions())
    tagged = {p.relative_to(library).as_posix(): {t.hierarchical for t in ts} for p, ts in report.tags.items()}
    assert set(tagged) == {"2024/iphone/IMG_0001.HEIC", "2024/web.avif", "2024/camera/DSC_0001.dng",
                           "2024/camera/DSC_0002.DNG", "rotated.jpg", "2023/deep/er/blue.png", "2023/broken.jpg",
                           "2023/blocked.jpg"}  # nothing hidden, nothing through the loop
    assert report.found.hidden == 2 and report.found.symlinks == 1 and not report.skipped
    assert tagged["2024/iphone/IMG_0001.HEIC"] == {"headmaster|warm", "headmaster|hue|red"}
    assert tagged["2024/web.avif"] == {"headmaster|hue|blue"}
    assert tagged["2024/camera/DSC_0001.dng"] == {"headmaster|warm", "headmaster|hue|red"}  # the camera's preview
    assert tagged["rotated.jpg"] == {"headmaster|warm", "headmaster|hue|red"}
    for name in ("2024/iphone/IMG_0001.HEIC", "2024/camera/DSC_0002.DNG", "2023/deep/er/blue.png"):
        assert "headmaster:Heads" in (library / f"{name}.xmp").read_text()
    problems = {a.sidecar.name: a for a in report.problems()}
    assert set(problems) == {"broken.jpg.xmp", "blocked.jpg.xmp"}
    assert problems["broken.jpg.xmp"].what == "unreadable" and "cannot parse it" in problems["broken.jpg.xmp"].note
    blocked = problems["blocked.jpg.xmp"]
    assert blocked.what == "failed" and blocked.note == "cannot read it: Is a directory"
    assert (library / "2023" / "broken.jpg.xmp").read_bytes() == broken  # left as it was
    assert not (library / ".hidden" / "secret.jpg.xmp").exists()
    assert hashes(library) == before  # no image's bytes changed

    again = tag_library(trained, [library])  # nothing changed: nothing read, nothing written
    assert again.counts()["xmp"] == {"unchanged": 6, "unreadable": 1, "failed": 1}


def _make_read_only(folder):
    """chmod for a user; root ignores the mode bits, so as root the folder is made immutable (chattr +i)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"root, and chattr +i is refused here: {done.stderr.strip()}")
    return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_read_only_folder_is_one_line(trained, tmp_path):
    folder = tmp_path / "ro"
    photo = colour_image(folder / "a.png", "red", 1)
    before = photo.read_bytes()
    undo = _make_read_only(folder)
    try:
        r = hm(trained, "tag", str(folder))
    finally:
        undo()
    assert r.exit_code == 0 and "a.png.xmp: cannot write it" in r.stderr and "Traceback" not in r.output
    assert photo.read_bytes() == before and not (folder / "a.png.xmp").exists()


def test_cli_summary_rerun_after_retrain_and_dry_run(trained, tmp_path):
    lib = tmp_path / "lib"
    for i, colour in enumerate(("red", "blue", "yellow")):
        colour_image(lib / "a" / f"{colour}.png", colour, 40 + i)
    r = hm(trained, "tag", str(lib), "--dry-run")
    assert r.exit_code == 0, r.output
    assert "would write " in r.stdout and "+headmaster|hue|red" in r.stdout and "nothing was written" in r.stdout
    assert not list(lib.rglob("*.xmp"))

    r = hm(trained, "tag", str(lib), "--txt", "--json", "--prefix", "photo")
    assert r.exit_code == 0, r.output
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("Tagged 3 images (hue, warm) in ") and "img/s: xmp 3 written; txt 3 written; " \
        "json 3 written; tags: " in line
    assert (lib / "a" / "red.txt").read_text() == "photo, red, warm\n"
    assert json.loads((lib / "a" / "blue.json").read_text())["tags"] == ["headmaster|hue|blue"]
    user_caption = lib / "a" / "yellow.txt"
    user_caption.write_text("my caption\n")

    rows = trained.store.conn.execute("SELECT head, bucket, tag FROM tags WHERE path = ?",
                                      (str((lib / "a" / "red.png").absolute()),)).fetchall()
    assert sorted(rows) == [("hue", "red", "headmaster|hue|red"), ("warm", "positive", "headmaster|warm")]

    train_one(trained, "warm", TrainConfig(epochs=30, seed=1))  # a retrain: a new checkpoint date
    r = hm(trained, "tag", str(lib), "--txt")
    assert r.exit_code == 0, r.output
    assert "yellow.txt: kept: not written by headmaster" in r.stderr and user_caption.read_text() == "my caption\n"
    assert "xmp 3 updated" in r.stdout  # the vectors were cached: only the records changed


def test_after_a_retrain_only_changed_decisions_are_rewritten(trained, tmp_path):
    """hmd's re-tag: tag_images with changed_decisions_only, and tagged_images, the stat-only record it reads."""
    lib = tmp_path / "lib"
    photos = [colour_image(lib / f"{colour}{i}.png", colour, 80 + 4 * i + j)
              for i in range(2) for j, colour in enumerate(("red", "blue", "green", "yellow"))]
    stats = {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in photos}
    options = TagOptions(changed_decisions_only=True)
    def created() -> str:  # what hmd's supervisor reads: the checkpoint's version (created_at + digest)
        path = trained.workspace.checkpoint_path("warm")
        return checkpoint_version(path, read_checkpoint_meta(path)["metadata"]["created_at"])

    db = trained.store.conn

    def buckets() -> dict[str, str]:
        return dict(db.execute("SELECT path, bucket FROM tags WHERE head = 'warm' AND path LIKE ?", (f"{lib}%",)))

    tag_images(trained, photos, ["warm"], options)
    assert tagged_images(trained.store, lib, stats, {"warm": created()}) == set(stats)
    before, sidecars = buckets(), {p: Path(f"{p}.xmp").read_bytes() for p in stats}
    train_one(trained, "warm", TrainConfig(epochs=30, seed=2))
    assert tagged_images(trained.store, lib, stats, {"warm": created()}) == set()  # a new checkpoint: all wait
    report = tag_images(trained, photos, ["warm"], options)
    after = buckets()
    changed = {p for p in stats if after[p] != before[p]}
    assert {p for p in stats if Path(f"{p}.xmp").read_bytes() != sidecars[p]} == changed
    assert report.counts()["xmp"].get("unchanged", 0) == len(photos) - len(changed)
    assert db.execute("SELECT count(*) FROM tag_checks WHERE checkpoint = ?", (created(),)).fetchone()[0] \
        == len(photos) - len(changed)
    assert tagged_images(trained.store, lib, stats, {"warm": created()}) == set(stats)  # a restart: nothing to do
    assert tag_images(trained, photos, ["warm"], options).counts()["xmp"] == {"unchanged": len(photos)}


def test_a_deleted_photo_loses_its_records_not_its_sidecar(trained, tmp_path):
    """forget_gone (hmd's listing) and forget_tag_records (a delete event): records of photos no longer there go;
    a sidecar left behind keeps its record (still ours); nothing on disk is deleted."""
    lib = tmp_path / "lib"
    keep = colour_image(lib / "keep.png", "red", 500)
    gone = colour_image(lib / "old" / "gone.png", "blue", 501)
    both = colour_image(lib / "old" / "both.png", "green", 502)
    tag_images(trained, [keep, gone, both], ["warm", "hue"], TagOptions(txt=True))
    db = trained.store.conn

    def recorded(table: str, column: str = "path") -> set[str]:
        return {r[0] for r in db.execute(f"SELECT {column} FROM {table} WHERE {column} LIKE ?", (f"{lib}%",))}

    assert recorded("tags") == {str(keep), str(gone), str(both)}
    gone.unlink()
    both.unlink()
    Path(f"{both}.xmp").unlink()  # the user cleared this photo's sidecars too
    both.with_suffix(".txt").unlink()
    assert forget_gone(trained.store, lib, {str(keep)}) == 2
    assert recorded("tags") == {str(keep)}
    assert recorded("tag_sidecars", "image") == {str(keep), str(gone)}  # gone's sidecars are still there
    assert Path(f"{gone}.xmp").is_file() and gone.with_suffix(".txt").is_file()
    assert forget_gone(trained.store, lib, {str(keep)}) == 0
    keep.unlink()
    assert forget_tag_records(trained.store, lib / "old") == 0  # a folder: only what was below it
    assert forget_tag_records(trained.store, keep) == 1 and recorded("tags") == set()


def test_find_images_leaves_out_an_excluded_folder(tmp_path):
    lib = tmp_path / "photos"
    colour_image(lib / "a.png", "red", 1)
    colour_image(lib / "headmaster" / "heads" / "hue" / "red" / "b.png", "red", 2)
    colour_image(lib / "headmaster-2" / "c.png", "red", 3)
    found = find_images([lib], exclude=[lib / "headmaster"])
    assert found.images == [lib / "a.png", lib / "headmaster-2" / "c.png"]


def test_uncertain_lists_nearest_the_cut(trained, tmp_path):
    lib = tmp_path / "lib"
    for i, colour in enumerate(("red", "blue", "green", "yellow")):
        colour_image(lib / f"{colour}.png", colour, 70 + i)
    near, skipped = nearest_the_cut(trained, [lib], ["warm"], limit=3)
    assert len(near) == 3 and not skipped
    assert [n.margin for n in near] == sorted(n.margin for n in near)
    r = hm(trained, "tag", str(lib), "--uncertain", "--heads", "warm", "--limit", "2")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["RANK", "IMAGE", "HEAD", "DECISION", "SCORE", "MARGIN"] and len(lines) == 3
    assert not list(lib.glob("*.xmp"))


def test_max_pixels_from_the_config(trained, tmp_path):
    lib = tmp_path / "pano"
    arr = np.tile(np.array(COLOURS["red"], dtype=np.uint8), (1000, 1200, 1))
    Image.fromarray(arr).save(lib.mkdir() or lib / "wide.png")  # 1.2 megapixels: PNG decodes at full size
    config = trained.workspace.root / "config.toml"
    try:
        config.write_text("[embedding]\nmax_pixels = 1000000\n")
        r = hm(trained, "tag", str(lib))
        assert r.exit_code == 0, r.output
        assert "wide.png: decompression bomb refused" in r.stderr and "max_pixels" in r.stderr
        config.write_text("[embedding]\nmax_pixels = 2000000\n")
        r = hm(trained, "tag", str(lib))
        assert r.exit_code == 0 and "Tagged 1 images" in r.stdout and (lib / "wide.png.xmp").exists()
    finally:
        config.unlink()


@pytest.mark.parametrize("args, message", [
    (["--heads", "warm", "--all"], "--heads A,B or --all, not both"),
    (["--threshold", "lots"], "--threshold takes T or HEAD=T"),
    (["--threshold", "warm=2"], "--threshold takes T or HEAD=T"),
    (["--threshold", "cold=0.5"], "'cold' is not one of the heads tagged"),
    (["--heads", "nope"], "nope"),
    (["--no-xmp"], "nothing to write"),
])
def test_cli_errors_are_one_line(trained, tmp_path, args, message):
    colour_image(tmp_path / "a.png", "red", 1)
    r = hm(trained, "tag", str(tmp_path), *args)
    assert r.exit_code == 1 and message in r.stderr and "Traceback" not in r.output


def test_missing_source_and_no_trained_heads(trained, tmp_path, ctx):
    r = hm(trained, "tag", str(tmp_path / "nowhere"))
    assert r.exit_code == 1 and "not found" in r.stderr
    with pytest.raises(HeadmasterError, match="no trained heads"):
        tag_library(ctx, [tmp_path])
