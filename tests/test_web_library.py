"""From a library back to the examples: the library queue, its copies into heads/, and the full-size view.

A workspace with a trained tiny-CLIP head and, beside it, a photo library (nested folders, PNG,
HEIC, AVIF, TIFF and a DNG with its preview) that `hm tag` has tagged, so its vectors are cached.
The ranking reads those vectors and embeds nothing; a label copies a photo into heads/<head>/<bucket>/
and leaves the library's file as it was (every photo is hashed before and after); the full-size
view serves formats browsers cannot show as a JPEG rendered from the decoded image.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import ORIGIN, colour_image, fill_bucket, post_json
from PIL import Image
from starlette.testclient import TestClient

from headmaster import HeadmasterError
from headmaster.config import LibraryConfig
from headmaster.curation import learn_copy, rank_library, tag_library, unlearn_copy
from headmaster.daemon import LocalWorker
from headmaster.embedding import Context, EmbedOptions, add_model
from headmaster.embedding.images import register_heif
from headmaster.heads import TrainConfig, train_one
from headmaster.store import Store
from headmaster.web import ReviewService
from headmaster.web.app import create_app
from headmaster.web.backend import library_names
from headmaster.workspace import Workspace

MIXES = [(200, 60), (150, 110), (125, 125), (110, 150), (60, 200)]  # red .. blue: some near the cut


def photo_hashes(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every file below `root` but our sidecars -> (SHA-256, mtime_ns, inode): content and file both untouched."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix != ".xmp":
            st = p.stat()
            out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_ino)
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mix(path: Path, r: int, b: int, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 48, 3), (r, 30, b), np.uint8)).save(path, format=fmt)
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory, clip_path):
    """workspace/heads/colour (red, blue; trained) and Pictures/ beside it, tagged by hm tag."""
    from dng import make_dng

    root = tmp_path_factory.mktemp("web-library")
    ws = root / "workspace"
    fill_bucket(ws / "heads" / "colour" / "red", "red", 12, 0)
    fill_bucket(ws / "heads" / "colour" / "blue", "blue", 12, 100)
    photos = root / "Pictures"
    for i, (r, b) in enumerate(MIXES):
        mix(photos / ("2024" if i % 2 else "2025/trip") / f"mix_{i}.png", r, b)
    register_heif()
    mix(photos / "phone" / "IMG_0001.HEIC", 190, 70, "HEIF")
    mix(photos / "phone" / "web.avif", 70, 190, "AVIF")
    mix(photos / "scans" / "scan.tif", 170, 90, "TIFF")
    make_dng(photos / "camera" / "DSC_0002.DNG", "jpeg", preview_size=(40, 32))
    example = ws / "heads" / "colour" / "red" / "red_000.png"
    (photos / "2024" / "already.png").write_bytes(example.read_bytes())  # an example's content: not shown
    with Context.open(str(ws), EmbedOptions(device="cpu", progress=False)) as c:
        add_model(c.store, "tiny-clip", str(clip_path), 24)
        train_one(c, "colour", TrainConfig(epochs=10))
        report = tag_library(c, [photos], ["colour"])
    assert not report.skipped, report.skipped
    return ws, photos


@pytest.fixture(scope="module")
def service(site):
    ws, photos = site
    models = LocalWorker(Workspace(ws), EmbedOptions(device="cpu", progress=False))  # as `hm serve` runs it
    s = ReviewService(Workspace(ws), models.call, libraries=[LibraryConfig(path=f"{photos}/2024/..//")])  # normalised
    yield s
    s.close()
    models.close()


def post(client, guard, url: str, body: dict | None = None):
    return post_json(client, guard, url, body, origin=ORIGIN)


def queue(client) -> dict:
    r = client.get("/heads/colour/library/Pictures.json?limit=1000")
    assert r.status_code == 200, r.text
    return r.json()


# -- the ranking and the copy, as library functions ---------------------------------------------

def test_a_library_is_ranked_from_cached_vectors_and_nothing_is_embedded(site, tmp_path):
    ws, photos = site
    before = photo_hashes(photos)
    with Context.open(str(ws), EmbedOptions(device="cpu", progress=False)) as c:
        vectors = c.store.embedding_count()
        ranking = rank_library(c, photos, "colour")
        assert (ranking.photos, ranking.scored, ranking.waiting, ranking.examples) == (10, 9, 0, 1)
        margins = [p.margin for p in ranking.ranked]
        assert margins == sorted(margins) and len(margins) == 9
        assert "already.png" not in {p.path.name for p in ranking.ranked}  # the head's own example's content
        assert {p.guess for p in ranking.ranked} <= {"red", "blue"}
        assert {p.path.name for p in ranking.ranked[:2]} & {"mix_2.png", "mix_1.png", "mix_3.png"}  # the middle

        new = mix(photos / "2025" / "new.png", 128, 122)  # not tagged yet: waits for its vector
        try:
            again = rank_library(c, photos, "colour", limit=3)
            assert (again.photos, again.scored, again.waiting) == (11, 9, 1) and len(again.ranked) == 3
            flat = rank_library(c, photos, "colour", recursive=False)
            assert flat.photos == 0  # every photo is in a folder below the root
            assert c.store.embedding_count() == vectors  # ranked, and not one image decoded or embedded
        finally:
            new.unlink()
    assert photo_hashes(photos) == before


def test_learn_copy_copies_the_photo_in_and_leaves_the_library_alone(site, tmp_path):
    ws, photos = site
    source = photos / "2024" / "mix_1.png"
    before = photo_hashes(photos)
    red, blue = ws / "heads" / "colour" / "red", ws / "heads" / "colour" / "blue"
    clash = blue / "mix_1.png"
    colour_image(clash, "blue", 999)  # the user's own example already has the name: the copy gets another
    with Store(ws / "headmaster.db") as store:
        hash_ = sha(source)
        learned = learn_copy(store, Workspace(ws), "colour", "red", source, hash_)
        assert learned.action == "added" and learned.example == red / "mix_1.png"
        assert sha(learned.example) == hash_ and learned.example.stat().st_ino != source.stat().st_ino  # a copy
        assert not [p for p in red.iterdir() if p.name.startswith(".")]  # no temp file left behind
        assert learn_copy(store, Workspace(ws), "colour", "red", source, hash_).action == "unchanged"
        moved = learn_copy(store, Workspace(ws), "colour", "blue", source, hash_)  # relabelled: moved, not copied
        assert moved.action == "moved" and moved.previous == "red" and moved.example == blue / "mix_1_1.png"
        assert not (red / "mix_1.png").exists() and clash.is_file()
        kinds = store.conn.execute("SELECT kind, bucket FROM corrections WHERE hash = ? ORDER BY id", (hash_,))
        assert kinds.fetchall() == [("library", "red"), ("library", "blue")]

        with pytest.raises(HeadmasterError, match="not an example copied from a library"):
            unlearn_copy(store, "colour", hash_, clash, source)  # never the user's own file
        unlearn_copy(store, "colour", hash_, moved.example, source)
        assert not moved.example.exists() and clash.is_file()
        assert store.file_records([str(moved.example)]) == {}
        with pytest.raises(HeadmasterError, match="is not a bucket"):
            learn_copy(store, Workspace(ws), "colour", "_excluded", source, hash_)
    clash.unlink()
    assert photo_hashes(photos) == before


def test_library_names_are_the_folders_own_and_stay_apart():
    libs = [LibraryConfig(path="/a/Pictures"), LibraryConfig(path="/b/Pictures"), LibraryConfig(path="/c/Phone")]
    assert list(library_names(libs)) == ["Pictures", "Pictures-2", "Phone"]
    assert library_names(libs)["Pictures-2"].path == "/b/Pictures"


# -- the page ---------------------------------------------------------------------------------

def test_the_library_queue_and_its_json_twin(client, site):
    ws, photos = site
    q = queue(client)
    assert q["view"] == "library" and q["head"] == "colour" and q["buckets"] == ["blue", "red"]
    assert q["library"] == {"name": "Pictures", "path": str(photos), "photos": 10, "scored": 9, "waiting": 0,
                            "examples": 1}
    items = q["items"]
    assert len(items) == 9 and {i["where"] for i in items} == {"library"} and {i["library"] for i in items} == \
        {"Pictures"}
    assert [i["margin"] for i in items] == sorted(i["margin"] for i in items)
    assert {i["source"] for i in items} >= {"2024/mix_1.png", "phone/IMG_0001.HEIC", "camera/DSC_0002.DNG"}

    html = client.get("/heads/colour/library/Pictures").text
    assert 'data-view="library"' in html and 'data-library="Pictures"' in html
    assert re.search(r'class="sources".*classified/colour/uncertain.*library <b>Pictures</b>', html, re.S)
    assert html.count('class="card from-library"') == 9 and "copies</b> the photo" in html
    assert 'name="library" value="Pictures"' in html  # the plain forms come back to this page
    assert client.get("/heads/colour.json").json()["libraries"] == ["Pictures"]
    assert 'href="/heads/colour/library/Pictures"' in client.get("/heads/colour").text

    overview = client.get("/")
    assert 'data-library="' + str(photos) + '"' in overview.text
    assert 'href="/heads/colour/library/Pictures"' in overview.text
    libs = client.get("/index.json").json()["libraries"]
    assert libs == [{"name": "Pictures", "path": str(photos), "heads": "all"}]  # counts are hmd's (no daemon here)

    assert client.get("/heads/colour/library/Nowhere.json").status_code == 404
    assert client.get("/heads/colour/library/Nowhere").status_code == 404
    assert client.get("/heads/nope/library/Pictures.json").status_code == 404
    cards = client.get("/heads/colour/cards?view=library&library=Pictures&limit=2")
    assert cards.status_code == 200 and cards.text.count('class="card from-library"') == 2


def test_a_label_copies_the_photo_into_the_bucket_and_undo_removes_the_copy(client, guard, site):
    ws, photos = site
    before = photo_hashes(photos)
    item = next(i for i in queue(client)["items"] if i["source"] == "2025/trip/mix_0.png")
    r = post(client, guard, "/api/label", {"head": "colour", "id": item["id"], "bucket": "red"})
    assert r.status_code == 200, r.text
    action = r.json()["action"]
    copy = ws / "heads" / "colour" / "red" / "mix_0.png"
    assert action["kind"] == "copy" and action["learned"] == "added" and action["source"] == str(
        photos / "2025" / "trip" / "mix_0.png") and action["destination"] == "heads/colour/red/mix_0.png"
    assert copy.is_file() and sha(copy) == item["id"]
    assert photo_hashes(photos) == before  # the library's file stays where it is, as it was
    assert item["id"] not in {i["id"] for i in queue(client)["items"]}  # an example now: off the queue
    assert client.get("/").status_code == 200 and client.get(f"/images/{item['id']}").status_code == 200

    r = post(client, guard, "/api/undo")
    assert r.json()["action"]["kind"] == "copy" and 'data-where="library"' in r.json()["card"]
    assert not copy.exists() and photo_hashes(photos) == before
    assert item["id"] in {i["id"] for i in queue(client)["items"]}

    # a plain form (no script) answers with a redirect back to the library queue
    r = client.post("/api/label", data={"csrf": guard.csrf, "head": "colour", "id": item["id"], "bucket": "blue",
                                        "view": "library", "library": "Pictures"},
                    headers={"origin": ORIGIN}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/heads/colour/library/Pictures?notice=")
    assert (ws / "heads" / "colour" / "blue" / "mix_0.png").is_file()
    r = client.post("/api/undo", data={"csrf": guard.csrf, "head": "colour", "view": "library",
                                       "library": "Pictures"}, headers={"origin": ORIGIN}, follow_redirects=False)
    assert r.status_code == 303 and "no+longer+an+example" in r.headers["location"]
    assert not (ws / "heads" / "colour" / "blue" / "mix_0.png").exists()
    assert photo_hashes(photos) == before


def test_a_new_bucket_from_a_library_photo_and_undo_takes_it_away(client, guard, site):
    ws, photos = site
    before = photo_hashes(photos)
    item = next(i for i in queue(client)["items"] if i["source"] == "phone/web.avif")
    r = post(client, guard, "/api/new-bucket", {"head": "colour", "id": item["id"], "name": "violet"})
    assert r.status_code == 200, r.text
    action = r.json()["action"]
    folder = ws / "heads" / "colour" / "violet"
    assert action["created"] and action["kind"] == "copy" and "add 19 more examples" in action["note"]
    assert [p.name for p in folder.iterdir()] == ["web.avif"] and photo_hashes(photos) == before
    post(client, guard, "/api/undo")
    assert not folder.exists() and photo_hashes(photos) == before


def test_skip_hides_a_library_photo_and_exclude_is_refused(client, guard, site):
    item = queue(client)["items"][0]
    assert post(client, guard, "/api/exclude", {"head": "colour", "id": item["id"]}).status_code == 404
    assert post(client, guard, "/api/skip", {"head": "colour", "id": item["id"]}).json()["action"]["kind"] == "skip"
    assert item["id"] not in {i["id"] for i in queue(client)["items"]}
    post(client, guard, "/api/undo")
    assert item["id"] in {i["id"] for i in queue(client)["items"]}


def test_a_library_not_tagged_yet_or_vanished_is_one_line_on_the_page(site, service, guard, tmp_path):
    ws, _ = site
    fresh = tmp_path / "Fresh"
    mix(fresh / "a.png", 130, 120)
    mix(fresh / "b.png", 120, 130)
    libraries = [LibraryConfig(path=str(tmp_path / "unmounted")), LibraryConfig(path=str(fresh))]
    s = ReviewService(Workspace(ws), service.model_call, libraries=libraries)
    try:
        with TestClient(create_app(s, guard), base_url=ORIGIN) as c:
            r = c.get("/heads/colour/library/unmounted")
            assert r.status_code == 200 and "is not there (an unmounted disk?)" in r.text
            assert c.get("/heads/colour/library/unmounted.json").status_code == 409
            q = c.get("/heads/colour/library/Fresh.json").json()
            assert q["library"]["waiting"] == 2 and q["items"] == []
            page = c.get("/heads/colour/library/Fresh").text
            assert f"tag the library first (<code>hm tag {fresh}</code>)" in page and "2 wait for" in page
    finally:
        s.close()


# -- the full-size view --------------------------------------------------------------------------

@pytest.mark.parametrize("source, size", [("phone/IMG_0001.HEIC", (48, 40)), ("phone/web.avif", (48, 40)),
                                          ("scans/scan.tif", (48, 40)), ("camera/DSC_0002.DNG", (40, 32))])
def test_the_full_size_view_renders_heic_avif_tiff_and_raw_as_jpeg(client, site, source, size):
    ws, photos = site
    before = photo_hashes(photos)
    item = next(i for i in queue(client)["items"] if i["source"] == source)
    r = client.get(f"/images/{item['id']}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.format == "JPEG" and im.size == size  # the decoded image (a DNG: its camera preview)
    again = client.get(f"/images/{item['id']}")
    assert again.content == r.content  # made once per content, then served from .thumbs/
    assert list((ws / ".thumbs").rglob(f"{item['id']}-4096.jpg"))
    assert photo_hashes(photos) == before


def test_the_full_size_view_serves_what_browsers_show_as_it_is(client, site):
    ws, photos = site
    item = next(i for i in queue(client)["items"] if i["source"] == "2024/mix_1.png")
    r = client.get(f"/images/{item['id']}")
    assert r.headers["content-type"] == "image/png" and r.content == (photos / "2024" / "mix_1.png").read_bytes()


def test_hm_serve_serves_the_configured_librarys_queue(site):
    ws, photos = site
    config = ws.parent / "serve.toml"
    config.write_text(f'workspace = "{ws}"\n[[library]]\npath = "{photos}"\nheads = ["colour"]\n')
    env = dict(os.environ, HEADMASTER_CONFIG=str(config), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "headmaster.cli", "--workspace", str(ws), "serve", "--listen",
                             "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line).group(0)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "heads/colour/library/Pictures.json", timeout=30) as resp:
                    q = json.load(resp)
                break
            except OSError:
                assert time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.1)
        assert q["library"]["photos"] == 10 and len(q["items"]) == 9
    finally:
        proc.terminate()
        proc.wait(timeout=20)
