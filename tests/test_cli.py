"""The `hm` walkthrough of the spec, driven through the real click commands."""

import re
import shutil
import sqlite3

import pytest
import torch
from click.testing import CliRunner
from helpers import colour_image, fill_bucket, run_hm

from headmaster.cli import cli
from headmaster.store import Store


@pytest.fixture
def hm(workspace):
    runner = CliRunner()

    def invoke(*args, ok=True):
        result = runner.invoke(cli, ["--workspace", str(workspace), *args], catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return invoke


def _one_error_line(result, pattern):
    assert result.exit_code == 1
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("fixture, dim", [("clip_path", 24), ("siglip_path", 32), ("dinov2_path", 32),
                                          ("timm_path", 256)])
def test_walkthrough_sorts_red_and_blue(hm, workspace, tmp_path, request, fixture, dim):
    model = request.getfixturevalue(fixture)
    fill_bucket(workspace / "heads" / "colour" / "red", "red", 24, 0)
    fill_bucket(workspace / "heads" / "colour" / "blue", "blue", 24, 100)
    assert "activated" in hm("model-add", "--name", "m", "--path", str(model), "--dim", str(dim)).output
    assert "Active model: m" in hm("model-activate", "--name", "m").output
    assert re.search(r"^\* m\s+%d\s+0\s" % dim, hm("model-list").output, re.M)
    first = hm("embed").output
    assert "Embedded 48 images with m (0 cached)" in first
    assert "Embedded 0 images with m (48 cached)" in hm("embed").output
    out = hm("train", "--head", "colour").output
    assert "Trained colour (binary, 2 classes, 48 images" in out
    ck = torch.load(workspace / "out" / "colour.pt", weights_only=True)
    assert set(ck) >= {"type", "input_dim", "model", "model_state_dict", "threshold", "classes", "sources",
                       "metadata"}
    assert ck["model"] == "m" and ck["input_dim"] == dim and ck["classes"] == ["blue", "red"]
    assert ck["sources"]["red"][0] == "colour/red/red_000.png" and len(ck["sources"]["blue"]) == 24

    src = tmp_path / "unsorted"
    reds = fill_bucket(src, "red", 6, 500)
    blues = fill_bucket(src, "blue", 6, 600)
    out = hm("classify", "--head", "colour", "--src", str(src)).output
    assert "Classified 12 images" in out
    dest = workspace / "classified" / "colour"
    assert sorted(p.name for p in (dest / "red").iterdir()) == sorted(p.name for p in reds)
    assert sorted(p.name for p in (dest / "blue").iterdir()) == sorted(p.name for p in blues)
    assert all(p.exists() for p in reds + blues)  # copies, sources untouched
    hm("classify", "--head", "colour", "--src", str(src))  # again: clashes get new names, nothing overwritten
    assert len(list((dest / "red").iterdir())) == 12 and (dest / "red" / "red_500_1.png").exists()


@pytest.fixture
def trained(hm, workspace, clip_path):
    fill_bucket(workspace / "heads" / "colour" / "red", "red", 24, 0)
    fill_bucket(workspace / "heads" / "colour" / "blue", "blue", 24, 100)
    hm("model-add", "--name", "tiny-clip", "--path", str(clip_path), "--dim", "24")
    hm("train")
    return workspace


def test_status_table_and_detail(hm, trained):
    fill_bucket(trained / "heads" / "weather" / "sunny", "yellow", 3)
    fill_bucket(trained / "heads" / "weather" / "rainy", "blue", 2, 50)
    fill_bucket(trained / "heads" / "weather" / "cloudy", "green", 2, 60)
    fill_bucket(trained / "heads" / "weather" / "snowy", "red", 2, 70)
    lines = hm("status").output.splitlines()
    assert lines[0].split() == ["HEAD", "TYPE", "BUCKETS", "IMAGES", "TRAINED", "F1"]
    assert lines[1].split() == ["colour", "binary", "blue(24)", "red(24)", "48", "yes", "1.00"]
    assert lines[2].split() == ["weather", "multiclass", "cloudy(2)", "rainy(2)", "snowy(2)...", "9", "no", "—"]
    detail = hm("status", "--head", "colour").output
    assert detail.count("Head: colour") == 1
    for label in ["Head: colour", "Type: binary", "Model: tiny-clip", "Buckets: blue (24), red (24)",
                  "Accuracy: 1.00", "Precision:", "Recall:", "F1: 1.00", "Threshold:"]:
        assert label in detail
    assert re.search(r"^Trained: \d{4}-\d\d-\d\d$", detail, re.M)


def test_confusion_matrix_formats(hm, trained):
    fill_bucket(trained / "test" / "colour" / "red", "red", 4, 300)
    fill_bucket(trained / "test" / "colour" / "blue", "blue", 3, 400)
    out = hm("confusion-matrix", "--head", "colour").output.splitlines()
    assert out[0] == "colour"
    assert out[1].split() == ["Pred", "blue", "Pred", "red", "Total"]
    assert out[3].split() == ["Actual", "blue", "3", "0", "3"]
    assert out[4].split() == ["Actual", "red", "0", "4", "4"]
    assert out[-1] == "Accuracy: 7/7 (100.0%)"
    ext = hm("confusion-matrix", "--head", "colour", "--extended").output
    assert ext.count("[CORRECT]") == 7 and "[WRONG]" not in ext and "red_300.png" in ext
    # a custom test dir with a class the head does not know
    other = trained / "elsewhere"
    fill_bucket(other / "purple", "red", 2)
    _one_error_line(hm("confusion-matrix", "--head", "colour", "--test-dir", str(other), ok=False),
                    r"test folder\(s\) purple .* do not match the classes of head 'colour' \(blue, red\)")


def test_export_and_clean(hm, trained, tmp_path):
    assert "Exported 1 checkpoint(s)" in hm("export", "--dest", str(tmp_path / "exp")).output
    assert (tmp_path / "exp" / "colour.pt").exists()
    assert "Removed 1 checkpoint(s)" in hm("clean", "--head", "colour").output
    assert not (trained / "out" / "colour.pt").exists()
    assert list((trained / "heads" / "colour" / "red").iterdir())  # images untouched
    _one_error_line(hm("clean", "--head", "colour", ok=False), "no checkpoint for head 'colour'")


def test_bad_files_are_skipped_with_reason_and_left_in_place(hm, workspace, clip_path):
    red = workspace / "heads" / "colour" / "red"
    fill_bucket(red, "red", 20, 0)
    fill_bucket(workspace / "heads" / "colour" / "blue", "blue", 20, 100)
    (red / "empty.jpg").write_bytes(b"")
    (red / "text.png").write_text("not an image")
    good = colour_image(red / "full.jpg", "red", 999, size=(64, 64), fmt="JPEG").read_bytes()
    (red / "cut.jpg").write_bytes(good[: len(good) // 2])
    (red / "notes.txt").write_text("ignored")
    (red / ".DS_Store").write_bytes(b"\0")
    before = {p.name: p.read_bytes() for p in red.iterdir()}
    hm("model-add", "--name", "c", "--path", str(clip_path), "--dim", "24")
    out = hm("embed").output
    assert "Skipped heads/colour/red/empty.jpg: empty file" in out
    assert "Skipped heads/colour/red/text.png: not an image" in out
    assert "Skipped heads/colour/red/cut.jpg: truncated or corrupt" in out
    assert "3 skipped" in out and "ignored 2 non-image or hidden files" in out
    assert {p.name: p.read_bytes() for p in red.iterdir()} == before
    out = hm("train").output
    assert "Trained colour" in out and "39 train" not in out  # 41 usable images
    assert "41 images" in out


def test_label_conflict_reported(hm, workspace, clip_path):
    fill_bucket(workspace / "heads" / "pet" / "cat", "red", 5)
    fill_bucket(workspace / "heads" / "pet" / "dog", "blue", 5, 20)
    shutil.copy(workspace / "heads" / "pet" / "cat" / "red_000.png", workspace / "heads" / "pet" / "dog" / "dup.png")
    hm("model-add", "--name", "c", "--path", str(clip_path), "--dim", "24")
    out = hm("embed").output
    assert "label conflict: head 'pet': identical image in buckets cat and dog" in out


def test_identical_files_across_heads_embedded_once(hm, workspace, clip_path):
    fill_bucket(workspace / "heads" / "a" / "x", "red", 3)
    fill_bucket(workspace / "heads" / "a" / "y", "blue", 3, 10)
    shutil.copytree(workspace / "heads" / "a", workspace / "heads" / "b")
    hm("model-add", "--name", "c", "--path", str(clip_path), "--dim", "24")
    assert "Embedded 6 images" in hm("embed").output
    conn = sqlite3.connect(workspace / "headmaster.db")
    assert conn.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0] == 6


def test_model_add_learns_the_vector_size(hm, dinov2_path):
    out = hm("model-add", "--name", "d", "--path", str(dinov2_path)).output
    assert "Added model d" in out and "dim 32" in out
    assert re.search(r"^\* d\s+32\s+0\s", hm("model-list").output, re.M)


def test_relative_model_folder_is_stored_normalised(hm, clip_path, monkeypatch):
    monkeypatch.chdir(clip_path.parent)
    hm("model-add", "--name", "rel", "--path", f"../{clip_path.parent.name}/{clip_path.name}", "--dim", "24")
    assert f"  {clip_path}" in hm("model-list").output


def test_user_errors_are_one_line(hm, workspace, clip_path, tmp_path):
    _one_error_line(hm("embed", ok=False), "no heads in .*try `hm demo` first")
    _one_error_line(hm("model-add", "--name", "x", "--path", str(tmp_path / "missing"), "--dim", "3", ok=False),
                    "model folder not found")
    _one_error_line(hm("model-add", "--name", "wrong", "--path", str(clip_path), "--dim", "512", ok=False),
                    "produces 24-dimensional vectors, not --dim 512: give --dim 24 or leave --dim out")
    _one_error_line(hm("model-add", "--name", "hub", "--path", "nobody/no-such-model", "--dim", "8", ok=False),
                    "cannot load model 'hub'")
    assert "No models registered" in hm("model-list").output  # refused models are not registered
    with Store(workspace / "headmaster.db") as store:  # registered right, then the folder changed under it
        store.add_model("wrong", str(clip_path), 512)
    fill_bucket(workspace / "heads" / "solo" / "only", "red", 2)
    _one_error_line(hm("embed", ok=False), "produces 24-dimensional vectors but was registered with --dim 512")
    hm("model-add", "--name", "ok", "--path", str(clip_path), "--dim", "24")
    hm("model-activate", "--name", "ok")
    _one_error_line(hm("train", "--head", "nope", ok=False), "unknown head 'nope'")
    _one_error_line(hm("train", "--head", "solo", ok=False), "needs at least 2 buckets")
    _one_error_line(hm("classify", "--head", "solo", "--src", str(tmp_path), ok=False), "not trained yet")
    _one_error_line(hm("confusion-matrix", "--head", "solo", ok=False), "not trained yet")
    _one_error_line(hm("model-activate", "--name", "ghost", ok=False), "unknown model 'ghost'")
    _one_error_line(hm("export", "--dest", str(tmp_path / "x"), ok=False), "no checkpoints")


def test_untrusted_checkpoint_refused(hm, trained, tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (trained / "out" / "colour.pt").write_bytes(pickle.dumps({"type": Evil()}, protocol=2))
    src = tmp_path / "src"
    fill_bucket(src, "red", 1)
    _one_error_line(hm("classify", "--head", "colour", "--src", str(src), ok=False), "cannot read checkpoint")


def test_real_entry_point_offline(workspace, clip_path):
    """`hm` as a real process, through the same loading code a hub model goes through."""
    fill_bucket(workspace / "heads" / "colour" / "red", "red", 3)
    fill_bucket(workspace / "heads" / "colour" / "blue", "blue", 3, 10)
    assert run_hm(["model-add", "--name", "c", "--path", str(clip_path), "--dim", "24"], workspace).returncode == 0
    r = run_hm(["embed"], workspace)
    assert r.returncode == 0 and "Embedded 6 images with c" in r.stdout
    r = run_hm(["classify", "--head", "colour", "--src", str(workspace)], workspace)
    assert r.returncode == 1 and r.stderr.strip().startswith("Error: head 'colour' is not trained yet")
    assert "Traceback" not in r.stderr


def test_cli_import_stays_light():
    """`hm --help` and friends must not pay for torch: heavy modules load when a command runs."""
    import subprocess
    import sys

    code = "import sys, headmaster.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    from headmaster.cli import SIDECAR_KINDS
    from headmaster.curation.sidecars import KINDS
    assert SIDECAR_KINDS == KINDS
