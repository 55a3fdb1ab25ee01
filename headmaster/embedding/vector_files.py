"""Cached vectors as Parquet files: `hm vectors export`, `hm vectors import`, and `hm embed --engine ray --out`.

One row per content: content_hash (string, the file's SHA-256), model (string, the registered model's
name), dim (int32) and vector (fixed_size_list<float32>[dim]). The model is named, not numbered: a
model's id is local to one headmaster.db, its name is what another workspace registers it under.
Importing checks every file before it writes anything, and refuses a model this workspace has not
registered or one whose vectors have another size, with one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from headmaster import HeadmasterError
from headmaster.store import Model, Store

if TYPE_CHECKING:
    import pyarrow as pa

COLUMNS = ("content_hash", "model", "dim", "vector")
ROWS_PER_FILE = 200_000  # ~1 GB of 1280-d vectors per file at most; row groups of ROW_GROUP
ROW_GROUP = 10_000


def _pa():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # a dependency of headmaster; only a broken install lacks it
        raise HeadmasterError("Parquet files need pyarrow: pip install pyarrow") from None
    return pa, pq


def vector_table(hashes: list[str], model: str, vectors: np.ndarray) -> "pa.Table":
    pa, _ = _pa()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(hashes), -1)
    dim = vectors.shape[1]
    return pa.table({"content_hash": pa.array(hashes, pa.string()),
                     "model": pa.array([model] * len(hashes), pa.string()),
                     "dim": pa.array(np.full(len(hashes), dim, np.int32)),
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), dim)})


class VectorWriter:
    """Writes vectors into DIR/vectors-00000.parquet, -00001, ...; never touches other files. Call close()."""

    def __init__(self, out_dir: Path, model: str, rows_per_file: int = ROWS_PER_FILE):
        self.out_dir, self.model, self.rows_per_file = Path(out_dir), model, rows_per_file
        existing = sorted(self.out_dir.glob("*.parquet")) if self.out_dir.is_dir() else []
        if existing:
            raise HeadmasterError(f"{self.out_dir} already holds Parquet files ({existing[0].name}, ...): "
                                  f"give an empty or new folder")
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise HeadmasterError(f"{self.out_dir} is a file, not a folder")
        self.files: list[Path] = []
        self.rows = 0
        self._writer = None
        self._in_file = 0
        self._pending: list[tuple[list[str], np.ndarray]] = []
        self._buffered = 0

    def write(self, hashes: list[str], vectors: np.ndarray) -> None:
        """Buffered: rows go out in row groups of ROW_GROUP (a Parquet row group per small batch is slow)."""
        self._pending.append((list(hashes), np.asarray(vectors, dtype=np.float32).reshape(len(hashes), -1)))
        self._buffered += len(hashes)
        if self._buffered >= ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        hashes = [h for part, _ in self._pending for h in part]
        vectors = np.concatenate([v for _, v in self._pending])
        self._pending, self._buffered = [], 0
        self._write(hashes, vectors)

    def _write(self, hashes: list[str], vectors: np.ndarray) -> None:
        _, pq = _pa()
        start = 0
        while start < len(hashes):
            if self._writer is None or self._in_file >= self.rows_per_file:
                self._close_file()
                self.out_dir.mkdir(parents=True, exist_ok=True)
                path = self.out_dir / f"vectors-{len(self.files):05d}.parquet"
                table = vector_table(hashes[:1], self.model, vectors[:1])
                # random floats do not compress or dictionary-encode: only the repeated model name is encoded
                self._writer = pq.ParquetWriter(str(path), table.schema, use_dictionary=["model"],
                                                compression="none")
                self.files.append(path)
            take = min(len(hashes) - start, self.rows_per_file - self._in_file)
            self._writer.write_table(vector_table(hashes[start:start + take], self.model,
                                                  vectors[start:start + take]), row_group_size=ROW_GROUP)
            self._in_file += take
            self.rows += take
            start += take

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer, self._in_file = None, 0

    def close(self) -> list[Path]:
        self._flush()
        self._close_file()
        return self.files


@dataclass
class ExportReport:
    model: Model
    rows: int
    files: list[Path]


def export_vectors(store: Store, model_name: str, out_dir: Path) -> ExportReport:
    """Write every cached vector of the model into Parquet files in `out_dir` (which must hold none yet)."""
    from headmaster.store import blob_to_vector

    model = store.model(model_name)
    writer = VectorWriter(Path(out_dir), model.name)
    try:
        for chunk in store.iter_vectors(model.id):
            writer.write([h for h, _ in chunk], np.stack([blob_to_vector(b) for _, b in chunk]))
    finally:
        files = writer.close()
    return ExportReport(model, writer.rows, files)


@dataclass
class ImportReport:
    rows: int = 0  # rows read
    added: int = 0  # vectors new to this cache
    files: list[Path] = field(default_factory=list)
    models: dict[str, int] = field(default_factory=dict)  # model name -> rows


def vector_files(src: Path) -> list[Path]:
    src = Path(src)
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise HeadmasterError(f"no such file or folder: {src}")
    files = sorted(src.glob("*.parquet"))
    if not files:
        raise HeadmasterError(f"no .parquet files in {src}")
    return files


def _check_file(path: Path, store: Store) -> dict[str, Model]:
    """The models a file's rows belong to, each registered here with the file's vector size; else one line."""
    pa, pq = _pa()
    try:
        schema = pq.read_schema(str(path))
        missing = [c for c in COLUMNS if c not in schema.names]
        if missing:
            raise HeadmasterError(f"{path} is not a headmaster vectors file (no column {', '.join(missing)})")
        meta = pq.read_table(str(path), columns=["model", "dim"])
    except (OSError, pa.ArrowException) as e:
        raise HeadmasterError(f"cannot read {path} as Parquet: {e}") from None
    vtype = schema.field("vector").type
    if not (pa.types.is_fixed_size_list(vtype) or pa.types.is_list(vtype) or pa.types.is_large_list(vtype)) \
            or not pa.types.is_floating(vtype.value_type):
        raise HeadmasterError(f"{path}: column 'vector' is {vtype}, not a list of floats")
    registered = {m.name: m for m in store.models()}
    found: dict[str, Model] = {}
    pairs = set(zip(meta.column("model").to_pylist(), meta.column("dim").to_pylist()))
    for name, dim in sorted(pairs, key=str):
        model = registered.get(name)
        if model is None:
            known = ", ".join(registered) or "none"
            raise HeadmasterError(f"{path} holds vectors of model '{name}', which this workspace has not registered "
                                  f"(models here: {known}): register the same model under that name first "
                                  f"(hm model-add --name {name} --path ...)")
        if dim != model.embed_dim:
            raise HeadmasterError(f"{path}: model '{name}' vectors there are {dim}-dimensional, but '{name}' here "
                                  f"gives {model.embed_dim}: not the same model; nothing was imported")
        if pa.types.is_fixed_size_list(vtype) and vtype.list_size != dim:
            raise HeadmasterError(f"{path}: vectors have {vtype.list_size} values but the dim column says {dim}")
        found[name] = model
    return found


def import_vectors(store: Store, src: Path, notify=None) -> ImportReport:
    """Merge Parquet vector files into this cache; every file is checked before anything is written.

    A content already cached for the model keeps its vector (same content, same model: the same vector).
    A workspace with no model yet registers the built-in one first when the files hold its vectors.
    """
    from headmaster.embedding.builtin import DEFAULT_MODEL_NAME
    from headmaster.embedding.registry import model_in_use

    _, pq = _pa()
    files = vector_files(src)
    if not store.models():
        names = set()
        for path in files:
            try:
                names.update(pq.read_table(str(path), columns=["model"]).column("model").to_pylist())
            except Exception:  # the checks below say what is wrong with the file
                pass
        if DEFAULT_MODEL_NAME in names:
            model_in_use(store, notify)
    plans = [(path, _check_file(path, store)) for path in files]
    report = ImportReport(files=files)
    for path, models in plans:
        for batch in pq.ParquetFile(str(path)).iter_batches(batch_size=ROW_GROUP, columns=list(COLUMNS)):
            names = batch.column(1).to_pylist()
            hashes = batch.column(0).to_pylist()
            column = batch.column(3)
            dims = batch.column(2).to_numpy()
            values = column.flatten().to_numpy().astype(np.float32, copy=False)
            offsets = np.concatenate([[0], np.cumsum(dims)])
            by_model: dict[str, list[tuple[str, np.ndarray]]] = {}
            for i, (h, name) in enumerate(zip(hashes, names)):
                by_model.setdefault(name, []).append((h, values[offsets[i]:offsets[i + 1]]))
            for name, items in by_model.items():
                model = models[name]
                have = store.cached_hashes(model.id, [h for h, _ in items])
                new = [(h, v) for h, v in items if h not in have]
                store.put_vectors(model.id, new)
                report.added += len(new)
                report.rows += len(items)
                report.models[name] = report.models.get(name, 0) + len(items)
    return report


def describe_import(report: ImportReport) -> str:
    models = ", ".join(f"{n} {c}" for n, c in sorted(report.models.items())) or "no rows"
    return (f"Imported {report.added} new vectors ({report.rows - report.added} already cached) from "
            f"{len(report.files)} file{'s' if len(report.files) != 1 else ''}: {models}")
