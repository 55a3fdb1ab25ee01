"""The one writer for commands that print rows: an aligned table, CSV or JSON.

Rows are dictionaries; a value may itself be a dictionary (one head's scores,
say). JSON keeps that nesting; the table and CSV flatten it into
`outer_inner` columns, the way seed 001 writes `presence_clear`. Columns come
in the order they first appear. The writer never decides what a row holds.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable, TextIO

from headmaster import HeadmasterError
from headmaster.fileops import write_atomic

FORMATS = ("table", "csv", "json")
FILE_FORMATS = ("parquet",)  # written to a file only (hm classify --output)
FLOAT_DIGITS = 4  # probabilities: four decimals are plenty to compare and sort by eye


def flatten(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'x': 1}} -> {'a_x': 1}; other values are kept as they are."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}_{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{FLOAT_DIGITS}f}"
    return str(value)


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return _json_ready(value.item())
    return value


def columns_of(rows: Iterable[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(key, None)
    return list(seen)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Aligned columns with an upper-case header; numbers right-aligned."""
    flat = [flatten(r) for r in rows]
    cols = columns_of(flat)
    if not cols:
        return ""
    cells = [[_cell(r.get(c)) for c in cols] for r in flat]
    numeric = [all(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in flat if c in r)
               for c in cols]
    header = [c.upper() for c in cols]
    widths = [max(len(header[i]), *(len(row[i]) for row in cells)) for i in range(len(cols))]
    lines = []
    for row in [header, *cells]:
        parts = [v.rjust(w) if num and row is not header else v.ljust(w) for v, w, num in zip(row, widths, numeric)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def format_csv(rows: list[dict[str, Any]]) -> str:
    flat = [flatten(r) for r in rows]
    cols = columns_of(flat)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for r in flat:
        writer.writerow([_cell(r.get(c)) for c in cols])
    return buf.getvalue()


def format_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(_json_ready(rows), indent=2, ensure_ascii=False) + "\n"


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    """The rows as text in `fmt` (table, csv or json)."""
    if fmt == "table":
        text = format_table(rows)
        return text + "\n" if text else ""
    if fmt == "csv":
        return format_csv(rows)
    if fmt == "json":
        return format_json(rows)
    raise HeadmasterError(f"unknown format '{fmt}' (use {', '.join(FORMATS)})")


def write_rows(rows: list[dict[str, Any]], fmt: str, stream: TextIO | None = None, path: Path | None = None,
               overwrite: bool = False) -> None:
    """Write to `path` (atomically; never over an existing file unless `overwrite`) or to `stream`."""
    if fmt == "parquet":
        if path is None:
            raise HeadmasterError("--format parquet writes a file: give --output FILE")
        return write_parquet_rows(rows, Path(path), overwrite)
    text = render(rows, fmt)
    if path is None:
        assert stream is not None
        stream.write(text)
        stream.flush()
        return
    path = Path(path)
    if path.exists() and not overwrite:
        raise HeadmasterError(f"{path} already exists (use --overwrite to replace it)")
    write_text_atomic(path, text, overwrite)


def write_text_atomic(path: Path, text: str, overwrite: bool = False) -> None:
    """Temp file in the same folder, fsynced, then renamed; without `overwrite` an existing file is kept."""
    try:
        write_atomic(path, lambda f: f.write(text.encode("utf-8")), replace=overwrite)
    except FileExistsError:
        raise HeadmasterError(f"{path} already exists (use --overwrite to replace it)") from None


def write_parquet_rows(rows: list[dict[str, Any]], path: Path, overwrite: bool = False) -> None:
    """The rows as one Parquet table, flattened into the CSV's columns (numbers stay numbers); atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.exists() and not overwrite:
        raise HeadmasterError(f"{path} already exists (use --overwrite to replace it)")
    flat = [flatten(r) for r in rows]
    cols = columns_of(flat)
    table = pa.table({c: [_json_ready(r.get(c)) for r in flat] for c in cols})
    try:
        write_atomic(path, lambda f: pq.write_table(table, f), replace=overwrite)
    except FileExistsError:
        raise HeadmasterError(f"{path} already exists (use --overwrite to replace it)") from None
