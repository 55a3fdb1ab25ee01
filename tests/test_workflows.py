"""Workflows on synthetic heads: rank, suspects, leaks, dupes, several heads at once, CSV labels, sidecars, dry runs.

One workspace with three trained heads (colour, hue, warm) is shared by the
module; tests that change it work on their own heads or their own folders.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import colour_image, fill_bucket
from PIL import Image

from headmaster import HeadmasterError
from headmaster.cli import cli
from headmaster.curation import find_suspects
from headmaster.curation.labels import import_labels, read_label_csv
from headmaster.curation.ranking import rank_folder
from headmaster.curation.sidecars import write_sidecars
from headmaster.embedding import Context, EmbedOptions, add_model
from headmaster.evaluation import indexed_leaks
from headmaster.evaluation.duplicates import find_near_duplicates, hashed_leaks
from headmaster.heads import TrainConfig, predict_heads, source_images, train_one
from headmaster.heads.output import render

FAST = TrainConfig(epochs=30)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, clip_path):
    """A workspace with colour (blue/red, one blue image filed as red), hue (4 colours) and warm (warm/cool)."""
    ws = tmp_path_factory.mktemp("wf") / "workspace"
    heads = ws / "heads"
    reds = fill_bucket(heads / "colour" / "red", "red", 10, 0)
    blues = fill_bucket(heads / "colour" / "blue", "blue", 10, 100)
    colour_image(heads / "colour" / "red" / "oops_blue.png", "blue", 777)  # the label error
    greens = fill_bucket(heads / "hue" / "green", "green", 10, 200)
    yellows = fill_bucket(heads / "hue" / "yellow", "yellow", 10, 300)
    for src, dest in ((reds, "hue/red"), (blues, "hue/blue"), (reds + yellows, "warm/warm"),
                      (blues + greens, "warm/cool")):
        (heads / dest).mkdir(parents=True, exist_ok=True)
        for p in src:
            shutil.copy(p, heads / dest / p.name)
    with Context.open(str(ws), EmbedOptions(device="cpu", progress=False)) as c:
        add_model(c.store, "tiny-clip", str(clip_path), 24)
        for head in ("colour", "hue", "warm"):
            train_one(c, head, FAST)
        yield c


@pytest.fixture
def inbox(tmp_path) -> Path:
    folder = tmp_path / "inbox"
    for i in range(3):
        colour_image(folder / f"new_red_{i}.png", "red", 500 + i)
        colour_image(folder / f"new_blue_{i}.png", "blue", 600 + i)
    return folder


def hm(ctx: Context, *args: str):
    return CliRunner().invoke(cli, ["--workspace", str(ctx.workspace.root), "--no-progress", *args])


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every folder and file below the roots: content hash, size and mtime (the embedding cache excluded)."""
    out: dict[str, tuple] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            out[dirpath] = ("dir", tuple(sorted(dirnames)))
            for f in filenames:
                if f.startswith("headmaster.db"):
                    continue
                p = Path(dirpath, f)
                st = p.stat()
                out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns, st.st_nlink)
    return out


def starting(text: str, prefix: str) -> int:
    return sum(line.startswith(prefix) for line in text.splitlines())


# -- ranking and suspects ---------------------------------------------------------------------------

def test_rank_orders_red_first(trained, inbox):
    report = rank_folder(trained, "colour", inbox)
    assert report.bucket == "red"  # a binary head's scored class by default
    names = [d.path.name for d in report.ranked]
    assert [n.split("_")[1] for n in names] == ["red"] * 3 + ["blue"] * 3
    probs = [d.probabilities["red"] for d in report.ranked]
    assert probs == sorted(probs, reverse=True)

    rev = rank_folder(trained, "colour", inbox, bucket="red", reverse=True, limit=2)
    assert [d.path.name.split("_")[1] for d in rev.ranked] == ["blue", "blue"] and rev.total == 6

    by_blue = rank_folder(trained, "colour", inbox, bucket="blue", limit=3)
    assert all("blue" in d.path.name for d in by_blue.ranked)
    with pytest.raises(HeadmasterError, match="no bucket 'green'"):
        rank_folder(trained, "colour", inbox, bucket="green")


def test_rank_cli_formats(trained, inbox):
    r = hm(trained, "rank", "--head", "colour", "--src", str(inbox), "--format", "csv")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [row["rank"] for row in rows] == ["1", "2", "3", "4", "5", "6"]
    assert rows[0]["image"].startswith("new_red") and rows[-1]["image"].startswith("new_blue")
    assert set(rows[0]) == {"rank", "image", "p_red", "decision", "score"}

    r = hm(trained, "rank", "--head", "colour", "--src", str(inbox), "--reverse", "--limit", "1", "--format", "json")
    data = json.loads(r.stdout)
    assert len(data) == 1 and data[0]["image"].startswith("new_blue") and data[0]["p_red"] < 0.5

    r = hm(trained, "rank", "--head", "colour", "--src", str(inbox))
    assert r.stdout.splitlines()[0].split() == ["RANK", "IMAGE", "P_RED", "DECISION", "SCORE"]

    r = hm(trained, "rank", "--head", "nope", "--src", str(inbox))
    assert r.exit_code == 1 and r.stderr.startswith("Error: head 'nope' is not trained yet")


def test_mislabelled_image_tops_suspects(trained):
    report = find_suspects(trained, "colour", folds=4, config=FAST)
    top = report.suspects[0]
    assert top.path.name == "oops_blue.png"
    assert top.bucket == "red" and top.preferred == "blue"
    assert top.probability < 0.5 < top.preferred_probability
    assert report.total == 21 and report.folds == 4
    # the image is scored by a head that never saw it; the checkpoint on disk is untouched
    before = trained.workspace.checkpoint_path("colour").stat().st_mtime_ns
    r = hm(trained, "suspects", "--head", "colour", "--limit", "2", "--folds", "3", "--epochs", "30",
           "--format", "json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert len(rows) == 2 and rows[0]["image"] == "colour/red/oops_blue.png" and rows[0]["preferred"] == "blue"
    assert trained.workspace.checkpoint_path("colour").stat().st_mtime_ns == before


# -- leaks and near-duplicates ----------------------------------------------------------------------

def test_image_copied_into_test_is_a_leak(trained):
    ws = trained.workspace
    head = ws.heads_dir / "leaky"
    for bucket in ("red", "blue"):
        shutil.copytree(ws.heads_dir / "colour" / bucket, head / bucket, ignore=shutil.ignore_patterns("oops*"))
    train_one(trained, "leaky", FAST)
    test = ws.test_dir / "leaky"
    colour_image(test / "red" / "fresh_red.png", "red", 900)
    colour_image(test / "blue" / "fresh_blue.png", "blue", 901)
    assert hashed_leaks(trained, "leaky") == []

    shutil.copy(head / "red" / "red_003.png", test / "red" / "copied.png")
    # status reads no file: a test image it has never hashed is counted, not checked
    r = hm(trained, "status", "--head", "leaky")
    assert r.exit_code == 0 and "Warning: leak" not in r.stdout and "1 image(s) not hashed yet" in r.stdout

    r = hm(trained, "confusion-matrix", "--head", "leaky")
    assert r.exit_code == 0, r.output
    assert "Warning: leak in head 'leaky'" in r.stderr and "test/leaky/red/copied.png" in r.stderr
    assert "heads/leaky/red/red_003.png" in r.stderr

    leaks, unknown = indexed_leaks(ws, trained.store, "leaky")  # confusion-matrix hashed the copy
    assert unknown == 0 and [(lk.kind, sorted(p.name for p in lk.files)) for lk in leaks] == \
        [("test", ["copied.png", "red_003.png"])]
    r = hm(trained, "status", "--head", "leaky")
    assert "Warning: leak in head 'leaky': the same image is in heads/ and test/" in r.stdout

    shutil.copy(head / "blue" / "blue_105.png", head / "red" / "blue_105.png")  # one content, two buckets
    kinds = sorted(lk.kind for lk in hashed_leaks(trained, "leaky"))
    assert kinds == ["buckets", "test"]


def test_dupes_finds_reencoded_image(trained):
    ws = trained.workspace
    colour_image(ws.heads_dir / "mix" / "a" / "red.png", "red", 1)
    colour_image(ws.heads_dir / "mix" / "a" / "green.png", "green", 2)
    colour_image(ws.heads_dir / "mix" / "b" / "blue.png", "blue", 3)
    colour_image(ws.heads_dir / "mix" / "b" / "yellow.png", "yellow", 4)
    (ws.test_dir / "mix" / "a").mkdir(parents=True)
    Image.open(ws.heads_dir / "mix" / "a" / "red.png").save(ws.test_dir / "mix" / "a" / "red_again.jpg", quality=90)

    # a random tiny model: a re-encode stays above 0.9995, different colours below 0.95 (measured), so
    # 0.999 separates them with room on both sides
    report = find_near_duplicates(trained, "mix", threshold=0.999)
    assert report.images == 5
    assert [(p.a.path.name, p.b.path.name, p.identical) for p in report.pairs] == [("red.png", "red_again.jpg", False)]
    assert 0.999 <= report.pairs[0].similarity < 1.0
    assert len(find_near_duplicates(trained, "mix", threshold=0.999, same_bucket=True).pairs) == 1

    shutil.copy(ws.heads_dir / "mix" / "b" / "blue.png", ws.heads_dir / "mix" / "a" / "blue_too.png")
    r = hm(trained, "dupes", "--head", "mix", "--format", "csv", "--threshold", "0.999")
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert rows[0] == {"similarity": "1.0000", "a": "heads/mix/a/blue_too.png", "b": "heads/mix/b/blue.png",
                       "identical": "yes"}
    assert {(row["a"], row["b"]) for row in rows} == {("heads/mix/a/blue_too.png", "heads/mix/b/blue.png"),
                                                     ("heads/mix/a/red.png", "test/mix/a/red_again.jpg")}
    r = hm(trained, "dupes", "--head", "mix", "--threshold", "1.0")
    assert "red_again" not in r.stdout and "blue_too.png" in r.stdout


# -- several heads in one pass, TTA ---------------------------------------------------------------

def test_multi_head_rows_csv_and_json(trained, inbox, tmp_path):
    r = hm(trained, "classify", "--heads", "colour,hue,warm", "--src", str(inbox), "--format", "csv")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert sorted(row["image"] for row in rows) == sorted(p.name for p in inbox.iterdir())
    expected = {"image", "colour_blue", "colour_red", "colour_prediction", "hue_blue", "hue_green", "hue_red",
                "hue_yellow", "hue_prediction", "warm_cool", "warm_warm", "warm_prediction"}
    assert set(rows[0]) == expected
    for row in rows:
        colour = row["image"].split("_")[1]
        assert row["colour_prediction"] == colour and row["hue_prediction"] == colour
        assert row["warm_prediction"] == ("warm" if colour == "red" else "cool")
        assert abs(sum(float(row[f"hue_{c}"]) for c in ("blue", "green", "red", "yellow")) - 1) < 1e-3

    out = tmp_path / "pred.json"
    r = hm(trained, "classify", "--heads", "colour, hue,warm", "--src", str(inbox), "--format", "json",
           "--output", str(out))
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert len(data) == 6 and all(set(row) == {"image", "colour", "hue", "warm"} for row in data)
    assert set(data[0]["hue"]) == {"blue", "green", "red", "yellow", "prediction"}
    assert not list((trained.workspace.root / "classified").glob("**/*.png"))  # rows mode copies nothing
    r = hm(trained, "classify", "--heads", "colour", "--src", str(inbox), "--format", "json", "--output", str(out))
    assert r.exit_code == 1 and "already exists" in r.stderr

    r = hm(trained, "classify", "--head", "colour", "--heads", "hue", "--src", str(inbox))
    assert r.exit_code == 1 and "either --head H or --heads" in r.stderr


def test_multi_head_embeds_each_image_once_and_tta_caches_mirrors(trained, tmp_path):
    folder = tmp_path / "once"
    fill_bucket(folder, "yellow", 4, 4000)
    report = predict_heads(trained, ["colour", "hue", "warm"], source_images(folder))
    assert report.embed.embedded == 4 and report.embed.cached == 0
    assert all(set(p.decisions) == {"colour", "hue", "warm"} for p in report.predictions)

    model = trained.store.active_model()
    hashes = [p.hash for p in report.predictions]
    assert trained.store.vectors(model.id, hashes, flipped=True) == {}
    tta = predict_heads(trained, ["hue"], source_images(folder), tta=True)
    mirrored = trained.store.vectors(model.id, hashes, flipped=True)
    assert set(mirrored) == set(hashes)  # cached apart from the seed's table, per model
    plain = trained.store.vectors(model.id, hashes)
    assert any(abs(mirrored[h] - plain[h]).max() > 1e-6 for h in hashes)  # noise images are not symmetric
    for a, b in zip(report.predictions, tta.predictions):
        assert a.path == b.path and b.decisions["hue"].bucket == "yellow"
        assert a.decisions["hue"].probabilities != b.decisions["hue"].probabilities
    again = predict_heads(trained, ["hue"], source_images(folder), tta=True)
    assert again.embed.embedded == 0


def test_single_head_classify_still_copies(trained, inbox, tmp_path):
    dest = tmp_path / "sorted"
    r = hm(trained, "classify", "--head", "colour", "--src", str(inbox), "--dest", str(dest))
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (dest / "red").iterdir()) == ["new_red_0.png", "new_red_1.png", "new_red_2.png"]
    assert len(list(inbox.iterdir())) == 6


# -- sidecars ---------------------------------------------------------------------------------------

def test_sidecars_written_and_existing_kept(trained, inbox):
    kept = inbox / "new_red_0.txt"
    kept.write_text("my own caption\n")
    report = write_sidecars(trained, ["colour"], inbox, "txt")
    assert report.counts() == {"written": 5, "kept": 1}
    assert kept.read_text() == "my own caption\n"
    # binary heads are tags named after the head: colour's positive bucket is red (the second sorted bucket)
    assert (inbox / "new_red_1.txt").read_text() == "colour\n" and (inbox / "new_blue_2.txt").read_text() == "\n"

    r = hm(trained, "classify", "--heads", "colour,warm", "--src", str(inbox), "--sidecar", "txt")
    assert r.exit_code == 0, r.output
    assert "kept" in r.stdout and (inbox / "new_red_1.txt").read_text() == "colour\n"  # no --overwrite: all kept

    r = hm(trained, "classify", "--heads", "colour,warm", "--src", str(inbox), "--sidecar", "txt", "--overwrite")
    assert r.exit_code == 0 and "6 replaced" in r.stdout
    assert kept.read_text() == "colour, warm\n" and (inbox / "new_blue_0.txt").read_text() == "\n"

    r = hm(trained, "classify", "--heads", "hue", "--src", str(inbox), "--sidecar", "txt", "--overwrite")
    assert (inbox / "new_blue_0.txt").read_text() == "blue\n"  # a multi-class head: the winning bucket

    r = hm(trained, "classify", "--head", "hue", "--src", str(inbox), "--sidecar", "json")
    doc = json.loads((inbox / "new_blue_1.json").read_text())
    assert doc["image"] == "new_blue_1.png" and doc["model"] == "tiny-clip"
    assert doc["heads"]["hue"]["prediction"] == "blue" and set(doc["heads"]["hue"]["probabilities"]) == \
        {"blue", "green", "red", "yellow"}
    assert len(list(inbox.glob("*.png"))) == 6 and not (trained.workspace.root / "classified" / "hue").exists()


def test_sidecar_names_do_not_collide(trained, tmp_path):
    folder = tmp_path / "pair"
    colour_image(folder / "same.png", "red", 1)
    colour_image(folder / "same.jpg", "blue", 2, fmt="JPEG")
    colour_image(folder / "other.png", "red", 3)
    write_sidecars(trained, ["colour"], folder, "txt")
    assert sorted(p.name for p in folder.glob("*.txt")) == ["other.txt", "same.jpg.txt", "same.png.txt"]


# -- dry runs ---------------------------------------------------------------------------------------

def test_dry_runs_change_no_file(trained, inbox):
    (inbox / "new_blue_0.txt").write_text("keep\n")
    before = snapshot(trained.workspace.root, inbox)
    r = hm(trained, "classify", "--head", "colour", "--src", str(inbox), "--dry-run")
    assert r.exit_code == 0, r.output
    would = [line for line in r.stdout.splitlines() if line.startswith("would copy")]
    assert len(would) == 6 and any("classified/colour/red/new_red_1.png" in line for line in would)
    assert "nothing was copied" in r.stdout

    r = hm(trained, "classify", "--head", "colour", "--src", str(inbox), "--sidecar", "json", "--dry-run", "--tta")
    assert r.exit_code == 0, r.output
    assert starting(r.stdout, "would write ") == 6
    r = hm(trained, "classify", "--head", "colour", "--src", str(inbox), "--sidecar", "txt", "--dry-run")
    assert starting(r.stdout, "would write ") == 5 and starting(r.stdout, "would keep ") == 1
    assert snapshot(trained.workspace.root, inbox) == before
    assert not [row for row in trained.store.sorts(limit=1000) if row["source"].startswith(str(inbox))]


# -- labels from a CSV ------------------------------------------------------------------------------

LABELS = """image,colour,hue,warm
r1.png,red,red,warm
b1.png,blue,blue,cool
g1.png,,green,cool

y1.png,,yellow,
"""


@pytest.fixture
def labelled(tmp_path):
    images = tmp_path / "images"
    for i, (name, colour) in enumerate((("r1", "red"), ("b1", "blue"), ("g1", "green"), ("y1", "yellow"),
                                        ("r2", "red"))):
        colour_image(images / f"{name}.png", colour, 2000 + i)
    ws = tmp_path / "ws"
    ws.mkdir()
    return images, ws


def tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_three_column_csv_makes_three_heads(labelled, tmp_path):
    images, ws = labelled
    labels = tmp_path / "labels.csv"
    labels.write_text(LABELS)
    r = CliRunner().invoke(cli, ["--workspace", str(ws), "import-labels", str(labels), "--images", str(images)])
    assert r.exit_code == 0, r.output
    assert tree(ws / "heads") == {"colour/red/r1.png", "colour/blue/b1.png", "hue/red/r1.png", "hue/blue/b1.png",
                                  "hue/green/g1.png", "hue/yellow/y1.png", "warm/warm/r1.png", "warm/cool/b1.png",
                                  "warm/cool/g1.png"}
    assert os.path.samefile(ws / "heads" / "hue" / "green" / "g1.png", images / "g1.png")  # hard links
    assert "9 linked" in r.stdout and "3 heads (colour, hue, warm)" in r.stdout
    r = CliRunner().invoke(cli, ["--workspace", str(ws), "import-labels", str(labels), "--images", str(images)])
    assert "9 already there" in r.stdout and len(tree(ws / "heads")) == 9  # running twice adds nothing

    other = ws / "heads" / "hue" / "red" / "r1.png"  # a different picture took the name: ours becomes r1_1.png
    other.unlink()
    colour_image(other, "red", 4242)
    for _ in range(2):
        r = CliRunner().invoke(cli, ["--workspace", str(ws), "import-labels", str(labels), "--images", str(images)])
        assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (ws / "heads" / "hue" / "red").iterdir()) == ["r1.png", "r1_1.png"]
    assert "9 already there" in r.stdout

    copies = tmp_path / "ws2"
    plan = read_label_csv(labels, images)
    report = import_labels(plan, copies / "heads", mode="copy")
    assert report.counts() == {"copied": 9} and (copies / "heads" / "hue" / "red" / "r1.png").stat().st_nlink == 1


def test_bad_rows_reported_by_line_and_never_imported(labelled, tmp_path):
    images, ws = labelled
    labels = tmp_path / "labels.csv"
    labels.write_text(LABELS + "missing.png,red,red,warm\nr2.png,red,red\n../r1.png,red,red,warm\n")
    plan = read_label_csv(labels, images)
    assert [(p.line, p.message.split(" ")[0]) for p in plan.problems] == \
        [(7, "unknown"), (8, "expected"), (9, "image")]
    r = CliRunner().invoke(cli, ["--workspace", str(ws), "import-labels", str(labels), "--images", str(images)])
    assert r.exit_code == 1
    assert f"{labels} line 7: unknown image 'missing.png'" in r.stderr
    assert f"{labels} line 8: expected 4 cells (image + 3 heads), found 3" in r.stderr
    assert "nothing imported" in r.stderr and not (ws / "heads").exists()

    r = CliRunner().invoke(cli, ["--workspace", str(ws), "import-labels", str(labels), "--images", str(images),
                                 "--skip-bad-rows"])
    assert r.exit_code == 0, r.output
    assert len(tree(ws / "heads")) == 9 and not any("r2" in p for p in tree(ws / "heads"))
    assert "3 bad rows skipped" in r.stdout


def test_import_dry_run_changes_no_file(labelled, tmp_path):
    images, ws = labelled
    labels = tmp_path / "labels.csv"
    labels.write_text(LABELS)
    before = snapshot(tmp_path)
    r = CliRunner().invoke(cli, ["--workspace", str(ws), "import-labels", str(labels), "--images", str(images),
                                 "--copy", "--dry-run"])
    assert r.exit_code == 0, r.output
    lines = [line for line in r.stdout.splitlines() if line.startswith("would copy")]
    assert len(lines) == 9 and any(line.endswith("heads/warm/cool/g1.png") for line in lines)
    assert snapshot(tmp_path) == before


def test_output_writer_flattens_for_csv_and_keeps_json_nested():
    rows = [{"image": "a.png", "hue": {"red": 0.25, "prediction": "red"}}]
    assert render(rows, "csv") == "image,hue_red,hue_prediction\na.png,0.2500,red\n"
    assert json.loads(render(rows, "json")) == rows
    assert render(rows, "table").splitlines()[0].split() == ["IMAGE", "HUE_RED", "HUE_PREDICTION"]


def test_removing_a_model_drops_its_mirrored_vectors_too(tmp_path):
    import numpy as np

    from headmaster.store import Store

    with Store(tmp_path / "hm.db") as store:
        model = store.add_model("m", "/nowhere", 3)
        store.put_vectors(model.id, [("h1", np.ones(3))])
        store.put_vectors(model.id, [("h1", np.zeros(3)), ("h2", np.ones(3))], flipped=True)
        assert set(store.vectors(model.id, ["h1", "h2"], flipped=True)) == {"h1", "h2"}
        assert store.vectors(model.id, ["h1"])["h1"].tolist() == [1.0, 1.0, 1.0]  # the two caches stay apart
        assert store.remove_model("m") == 1
        assert store.conn.execute("SELECT COUNT(*) FROM flip_embeddings").fetchone()[0] == 0
