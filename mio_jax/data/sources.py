"""Reading preference rows from local files or in-memory lists.

Supported sources (local paths or URLs such as ``gs://``, through ``mio_jax.paths``):
  * JSON Lines, optionally gzip-compressed (`.jsonl`, `.json`, `.jsonl.gz`, `.json.gz`);
  * Parquet (`.parquet`), read with pyarrow;
  * a folder written by Hugging Face `datasets.Dataset.save_to_disk`
    (`state.json` naming arrow stream files, plus `dataset_info.json`), read
    with pyarrow, so `datasets` is not needed at run time;
  * an in-memory list of dicts.
A source spec is one of these, a glob, or a list of them.

Each row comes with a row id naming where it is ("path:line" for JSONL, with
1-based lines; "path[row]" for Parquet and arrow; "rows[i]" for lists), used in
error messages and in the bad-row report.
"""

import gzip
import io
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from mio_jax import paths
from mio_jax.data import report

Row = tuple[str, Any]  # (row id, parsed row: a dict for good rows)


class Malformed(NamedTuple):
    """A JSONL line that is not valid JSON (``numbered_rows`` yields it as the row)."""

    error: str


def expand_paths(spec: str | os.PathLike | Sequence) -> list[str]:
    """Expands a path, glob, or list of them into a sorted list of paths (local or URLs).

    Args:
      spec: a path, a glob pattern, or a list/tuple of paths and globs.

    Returns:
      Paths in a deterministic order (each glob sorted, list order kept).

    Raises:
      FileNotFoundError: a path or glob that matches nothing.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    found: list[str] = []
    for item in items:
        item = os.fspath(item)
        if paths.has_wildcard(item):
            matches = paths.glob(item)
            if not matches:
                raise FileNotFoundError(f"data source glob {item!r} matches no file")
            found.extend(matches)
        elif paths.exists(item):
            found.append(item)
        else:
            raise FileNotFoundError(f"data source {item!r} does not exist")
    return found


def _json_lines(path: str) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of the non-blank lines of a JSONL file (gzip if ``.gz``)."""
    with paths.open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw
        for line_no, line in enumerate(io.TextIOWrapper(stream, encoding="utf-8"), start=1):
            if line.strip():
                yield line_no, line


def iter_jsonl(path: str) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each line of a JSONL file; malformed JSON stops.

    Raises:
      ValueError: naming ``path:line`` for a line that is not valid JSON.
    """
    for line_no, line in _json_lines(path):
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}: not valid JSON: {e}") from e


def _read_jsonl(path: str, log: report.BadRowLog) -> Iterator[Row]:
    for line_no, line in _json_lines(path):
        row_id = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            log.reject(row_id, report.MALFORMED_JSON, None, str(e))
            continue
        yield row_id, row


def _read_table(path: str, table: pa.Table) -> Iterator[Row]:
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}[{i}]", row


def _read_saved_dataset(path: str) -> Iterator[Row]:
    if paths.exists(paths.join(path, "dataset_dict.json")):
        splits = paths.read_json(paths.join(path, "dataset_dict.json")).get("splits", [])
        raise ValueError(
            f"{path} is a DatasetDict; point the data path at one split folder, "
            f"one of {[paths.join(path, s) for s in splits]}"
        )
    files = [d["filename"] for d in paths.read_json(paths.join(path, "state.json"))["_data_files"]]
    offset = 0
    for name in files:
        file = paths.join(path, name)
        if paths.is_remote(file):
            with paths.open(file, "rb") as source:
                table = pa.ipc.open_stream(source).read_all()
        else:
            with pa.memory_map(file) as source:
                table = pa.ipc.open_stream(source).read_all()
        for i, row in enumerate(table.to_pylist()):
            yield f"{path}[{offset + i}]", row
        offset += table.num_rows


def _raw_jsonl(path: str) -> Iterator[tuple[str, str]]:
    for line_no, line in _json_lines(path):
        yield f"{path}:{line_no}", line


def _parse(raw) -> Any:
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        return Malformed(str(e))


def _raw_path(path: str) -> Iterator[tuple[str, Any]]:
    """``(row id, row)`` of one file; JSONL rows as their unparsed line."""
    if not paths.isdir(path) and path.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        yield from _raw_jsonl(path)
    else:
        yield from read_path(path, report.BadRowLog())


def numbered_rows(spec: Any, *, max_rows: int = 0, select=None) -> Iterator[tuple[int, str, Any]]:
    """``(n, row id, row)`` for the rows ``n`` of a source spec that ``select(n)`` keeps.

    Every line of a JSONL file counts as a row (a malformed one too: its row is a
    ``Malformed``), and a JSONL line is parsed only when kept, so processes that split the
    rows between them (``select = lambda n: n % P == p``) each parse only their own.

    Args:
      spec: path / glob / list of paths, or a list of dicts (in-memory rows).
      max_rows: only rows ``n < max_rows`` (0 = all).
      select: ``n -> bool`` (None keeps every row).
    """
    if isinstance(spec, (list, tuple)) and spec and not isinstance(spec[0], (str, os.PathLike)):
        rows: Iterator = ((f"rows[{i}]", r) for i, r in enumerate(spec))
    else:
        rows = (row for path in expand_paths(spec) for row in _raw_path(path))
    for n, (row_id, raw) in enumerate(rows):
        if max_rows and n >= max_rows:
            return
        if select is None or select(n):
            yield n, row_id, _parse(raw)


def read_path(path: str, log: report.BadRowLog) -> Iterator[Row]:
    """Yields (row id, row) from one file or saved-dataset folder (local or remote).

    Args:
      path: a .jsonl/.json[.gz] file, a .parquet file, or a save_to_disk folder.
      log: bad-row log; malformed JSON lines are reported there.
    """
    if paths.isdir(path):
        if not paths.exists(paths.join(path, "state.json")):
            raise ValueError(
                f"{path} is a folder without state.json; expected a Hugging Face "
                "datasets save_to_disk folder"
            )
        yield from _read_saved_dataset(path)
    elif path.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        yield from _read_jsonl(path, log)
    elif path.endswith(".parquet"):
        with paths.open(path, "rb") as f:
            table = pq.read_table(f)
        yield from _read_table(path, table)
    else:
        raise ValueError(
            f"data source {path!r}: unknown file type (expected .jsonl, .jsonl.gz, "
            ".parquet or a save_to_disk folder)"
        )


def read_rows(spec: Any, log: report.BadRowLog, *, max_rows: int = 0) -> Iterator[Row]:
    """Yields (row id, row) for every row of a source spec, in a fixed order.

    Args:
      spec: path / glob / list of paths, or a list of dicts (in-memory rows).
      log: bad-row log for malformed lines.
      max_rows: stop after this many rows (0 = all).
    """
    if isinstance(spec, (list, tuple)) and spec and not isinstance(spec[0], (str, os.PathLike)):
        rows: Iterator[Row] = ((f"rows[{i}]", r) for i, r in enumerate(spec))
    else:
        rows = (row for path in expand_paths(spec) for row in read_path(path, log))
    for n, row in enumerate(rows):
        if max_rows and n >= max_rows:
            return
        yield row
