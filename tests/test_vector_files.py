"""hm vectors export / import: cached vectors as Parquet, carried between workspaces (no Ray needed)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from headmaster import HeadmasterError
from headmaster.cli import cli
from headmaster.embedding import VectorWriter, export_vectors, import_vectors
from headmaster.store import Store


def invoke(workspace: Path, *args, ok: bool = True):
    result = CliRunner().invoke(cli, ["--workspace", str(workspace), *args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def store_with(path: Path, name: str = "m", dim: int = 8, n: int = 0, seed: int = 0) -> tuple[Store, dict]:
    store = Store(path / "headmaster.db")
    model = store.add_model(name, "/models/" + name, dim)
    rng = np.random.default_rng(seed)
    vectors = {f"{seed:02d}{i:062x}": rng.standard_normal(dim).astype(np.float32) for i in range(n)}
    store.put_vectors(model.id, vectors.items())
    return store, vectors


def test_export_then_import_merges_exactly_the_vectors(tmp_path):
    src, vectors = store_with(tmp_path / "a", n=25)
    report = export_vectors(src, "m", tmp_path / "out")
    assert report.rows == 25 and [f.name for f in report.files] == ["vectors-00000.parquet"]
    dst, old = store_with(tmp_path / "b", n=3, seed=7)
    dst.put_vectors(dst.model("m").id, [(next(iter(vectors)), vectors[next(iter(vectors))])])
    imported = import_vectors(dst, tmp_path / "out")
    assert (imported.rows, imported.added) == (25, 24)  # one was there already
    got = dst.vectors(dst.model("m").id, list(vectors))
    assert set(got) == set(vectors) and all(np.array_equal(got[h], v) for h, v in vectors.items())
    assert dst.embedding_count() == 28
    again = import_vectors(dst, tmp_path / "out")
    assert again.added == 0 and dst.embedding_count() == 28


def test_writer_splits_files_and_refuses_a_folder_with_parquet(tmp_path):
    writer = VectorWriter(tmp_path / "v", "m", rows_per_file=4)
    writer.write([f"{i:064x}" for i in range(10)], np.ones((10, 3), np.float32))
    assert [f.name for f in writer.close()] == [f"vectors-0000{i}.parquet" for i in range(3)]
    with pytest.raises(HeadmasterError, match="already holds Parquet files"):
        VectorWriter(tmp_path / "v", "m")


def test_import_refuses_a_model_or_dimension_mismatch_and_writes_nothing(tmp_path):
    src, _ = store_with(tmp_path / "a", name="m", dim=8, n=5)
    export_vectors(src, "m", tmp_path / "out")
    other, _ = store_with(tmp_path / "b", name="m", dim=16)
    with pytest.raises(HeadmasterError, match=r"'m' vectors there are 8-dimensional, but 'm' here gives 16"):
        import_vectors(other, tmp_path / "out")
    unknown, _ = store_with(tmp_path / "c", name="n", dim=8)
    with pytest.raises(HeadmasterError, match=r"model 'm', which this workspace has not registered"):
        import_vectors(unknown, tmp_path / "out")
    assert other.embedding_count() == unknown.embedding_count() == 0


def test_vectors_commands_happy_path_and_one_line_errors(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    store_with(a, n=6)[0].close()
    store_with(b)[0].close()
    out = invoke(a, "vectors", "export", "--out", str(tmp_path / "out")).output
    assert out.strip() == f"Wrote 6 vectors of m (8-d) into 1 file in {tmp_path / 'out'}"
    assert invoke(b, "vectors", "import", str(tmp_path / "out")).output.strip() == \
        "Imported 6 new vectors (0 already cached) from 1 file: m 6"
    for args, pattern in [(("vectors", "export", "--out", str(tmp_path / "out")), r"already holds Parquet files"),
                          (("vectors", "export", "--model", "zz", "--out", str(tmp_path / "x")), r"unknown model 'zz'"),
                          (("vectors", "import", str(tmp_path / "none")), r"no such file or folder"),
                          (("vectors", "import", str(tmp_path)), r"no \.parquet files")]:
        result = invoke(a, *args, ok=False)
        lines = [l for l in result.output.splitlines() if l.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and re.search(pattern, lines[0]), result.output
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    result = invoke(b, "vectors", "import", str(tmp_path / "bad.parquet"), ok=False)
    assert result.exit_code == 1 and "cannot read" in result.output and "Traceback" not in result.output
