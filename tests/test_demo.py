"""`hm demo`: the README's first command, offline, on the sample photos and the built-in backbone."""

from __future__ import annotations

import re
import time

import pytest
import torch
from click.testing import CliRunner
from helpers import fill_bucket, run_hm

from headmaster.cli import cli
from headmaster.heads.demo import SAMPLES, held_back_samples, training_samples

MEASURED_ACCURACY = 1.00  # 40 of 40 held-back photos, measured (bench/RESULTS.md); one mistake is allowed


def _hm(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_samples_are_small_and_free():
    size = sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file())
    assert size < 3_000_000
    assert "CC0" in (SAMPLES / "LICENSE.md").read_text()
    assert len(training_samples()) == 96 and len(held_back_samples()) == 40


def test_demo_trains_and_sorts_every_held_back_photo(tmp_path, builtin_model):
    root = tmp_path / "demo"
    result = _hm("--no-progress", "demo", str(root))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Trained clothing (multiclass, 4 classes, 96 images" in out
    ck = torch.load(root / "out" / "clothing.pt", weights_only=True)
    assert ck["model"] == "default" and ck["input_dim"] == 1280
    assert ck["classes"] == ["hat", "pants", "shoes", "t-shirt"]

    originals = sorted(p.name for p in (root / "unsorted").iterdir())
    assert len(originals) == 40  # copies were made; every original is still there
    dest = root / "classified" / "clothing"
    sorted_names = sorted(p.name for p in dest.glob("*/*"))
    assert sorted_names == originals  # each one sorted once, into a bucket or uncertain/, none lost
    assert {p.parent.name for p in dest.glob("*/*")} <= {"hat", "pants", "shoes", "t-shirt", "uncertain"}

    accuracy = float(re.search(r"Accuracy on the held-back photos: ([0-9.]+)", out).group(1))
    assert accuracy >= MEASURED_ACCURACY - 0.03  # a real backbone on real photos
    right = sum(1 for p in dest.glob("*/*") if p.parent.name == _truth(root)[p.name])
    assert right / 40 == pytest.approx(accuracy, abs=0.005)  # what it prints is what happened on disk
    assert "HEADMASTER_WORKSPACE=" in out and "uv run hmd" in out and "http://127.0.0.1:7878" in out

    again = _hm("--no-progress", "demo", str(root))  # an earlier demo is reused: nothing copied twice
    assert again.exit_code == 0 and "Reusing the demo workspace" in again.output
    assert sorted(p.name for p in dest.glob("*/*")) == originals


def _truth(root):
    import json

    return json.loads((root / ".headmaster-demo").read_text())["held_back"]


def test_demo_refuses_a_folder_in_use(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    result = _hm("demo", str(tmp_path))
    assert result.exit_code == 1
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "is not empty" in lines[0]
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_demo_takes_a_workspace_that_holds_only_its_config(tmp_path):
    """`hm config init` then `hm demo` on the same folder (the order docs/daemon.md gives): the config is kept."""
    from headmaster.heads.demo import lay_out

    ws = tmp_path / "workspace"
    assert _hm("-w", str(ws), "config", "init").exit_code == 0
    config = (ws / "config.toml").read_bytes()
    layout = lay_out(ws)
    assert not layout.reused and len(list((ws / "unsorted").iterdir())) == 40
    assert (ws / "config.toml").read_bytes() == config
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.toml").write_text("")
    (tmp_path / "other" / "mine.txt").write_text("keep me")
    result = _hm("demo", str(tmp_path / "other"))  # anything beside the config: still refused
    assert result.exit_code == 1 and "is not empty" in result.output


@pytest.mark.parametrize("args, message, bad_head", [
    (["train"], "no heads in", False),
    (["train", "--head", "nope"], "unknown head 'nope'", False),
    (["train", "--head", "solo"], "needs at least 2 buckets", True),
    (["train"], "needs at least 2 buckets", True),
    (["embed", "--head", "nope"], "unknown head 'nope'", False),
    (["classify", "--head", "solo", "--src", "."], "not trained yet", True),
    (["evaluate", "--head", "nope"], "unknown head 'nope'", False),
])
def test_workspace_errors_answer_before_torch_loads(workspace, args, message, bad_head):
    if bad_head:  # one bucket only
        fill_bucket(workspace / "heads" / "solo" / "only", "red", 2)
    started = time.perf_counter()
    r = run_hm(args, workspace)
    seconds = time.perf_counter() - started
    assert r.returncode == 1 and r.stderr.startswith("Error: ") and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert seconds < 2.0, f"{args} took {seconds:.1f}s"  # a generous bound: torch alone takes several seconds
