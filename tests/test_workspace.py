from pathlib import Path

import pytest

from headmaster import HeadmasterError
from headmaster.workspace import Workspace, is_image_name, list_images


def test_extensions_case_insensitive_and_hidden_ignored(tmp_path):
    for name in ["a.JPG", "b.jpeg", "c.PNG", "d.webp", "e.BMP", "f.gif", "g.TIF", "h.tiff", "i.txt", ".hidden.jpg",
                 "notes.md"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    images, ignored = list_images(tmp_path)
    assert [p.name for p in images] == ["a.JPG", "b.jpeg", "c.PNG", "d.webp", "e.BMP", "f.gif", "g.TIF", "h.tiff"]
    assert ignored == 4  # i.txt, .hidden.jpg, notes.md, sub/
    assert not is_image_name(".x.png") and is_image_name("X.JpEg")
    assert not is_image_name("jpg") and not is_image_name(".jpg") and not is_image_name("a.jpg.txt")
    assert is_image_name(Path("/some/dir.d/x.tif")) and not is_image_name("/some/dir.jpg/x")
    # the fast child paths are ordinary paths: equal to, hashed like and printed like `folder / name`
    assert images == [tmp_path / p.name for p in images]
    assert {hash(p) for p in images} == {hash(tmp_path / p.name) for p in images}
    assert [str(p) for p in images] == [f"{tmp_path}/{p.name}" for p in images]


def test_env_var_overrides_default(monkeypatch, tmp_path):
    monkeypatch.setenv("HEADMASTER_WORKSPACE", str(tmp_path / "elsewhere"))
    assert Workspace.from_env().root == tmp_path / "elsewhere"
    monkeypatch.delenv("HEADMASTER_WORKSPACE")
    assert Workspace.from_env().root == Path("workspace").absolute()


def test_validation_errors_and_warnings(workspace):
    ws = Workspace(workspace)
    (workspace / "heads" / "solo" / "only").mkdir(parents=True)
    (workspace / "heads" / "solo" / "only" / "a.png").write_bytes(b"x")
    with pytest.raises(HeadmasterError, match="at least 2 buckets"):
        ws.head("solo").check()
    (workspace / "heads" / "pair" / "yes").mkdir(parents=True)
    (workspace / "heads" / "pair" / "no").mkdir(parents=True)
    (workspace / "heads" / "pair" / "yes" / "a.png").write_bytes(b"x")
    with pytest.raises(HeadmasterError, match="bucket 'no' of head 'pair' has no images"):
        ws.head("pair").check()
    (workspace / "heads" / "pair" / "no" / "b.png").write_bytes(b"x")
    warnings = ws.head("pair").check()
    assert len(warnings) == 2 and all("recommended" in w for w in warnings)
    head = ws.head("pair")
    assert head.head_type == "binary" and head.classes == ["no", "yes"]


def test_unknown_head_names_known_ones(workspace):
    (workspace / "heads" / "hotdog").mkdir()
    with pytest.raises(HeadmasterError, match="unknown head 'nope'.*heads: hotdog"):
        Workspace(workspace).head("nope")
