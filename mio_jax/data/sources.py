"""Reading preference rows from local files or in-memory lists.

Supported sources (local paths only):
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

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mio_jax.data import report

Row = tuple[str, Any]  # (row id, parsed row: a dict for good rows)


def expand_paths(spec: str | os.PathLike | Sequence) -> list[str]:
    """Expands a path, glob, or list of them into a sorted list of local paths.

    Args:
      spec: a path, a glob pattern, or a list/tuple of paths and globs.

    Returns:
      Paths in a deterministic order (each glob sorted, list order kept).

    Raises:
      FileNotFoundError: a path or glob that matches nothing.
      ValueError: a remote URL (only local paths are read).
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    paths: list[str] = []
    for item in items:
        item = os.fspath(item)
        if "://" in item:
            raise ValueError(f"data source {item!r}: only local paths are supported")
        if any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item))
            if not matches:
                raise FileNotFoundError(f"data source glob {item!r} matches no file")
            paths.extend(matches)
        elif os.path.exists(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"data source {item!r} does not exist")
    return paths


def _json_lines(path: str) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of the non-blank lines of a JSONL file (gzip if ``.gz``)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as raw:
        for line_no, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8"), start=1):
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
    if os.path.exists(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json")) as f:
            splits = json.load(f).get("splits", [])
        raise ValueError(
            f"{path} is a DatasetDict; point the data path at one split folder, "
            f"one of {[os.path.join(path, s) for s in splits]}"
        )
    with open(os.path.join(path, "state.json")) as f:
        files = [d["filename"] for d in json.load(f)["_data_files"]]
    offset = 0
    for name in files:
        with pa.memory_map(os.path.join(path, name)) as source:
            table = pa.ipc.open_stream(source).read_all()
        for i, row in enumerate(table.to_pylist()):
            yield f"{path}[{offset + i}]", row
        offset += table.num_rows


def read_path(path: str, log: report.BadRowLog) -> Iterator[Row]:
    """Yields (row id, row) from one local file or saved-dataset folder.

    Args:
      path: a .jsonl/.json[.gz] file, a .parquet file, or a save_to_disk folder.
      log: bad-row log; malformed JSON lines are reported there.
    """
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "state.json")):
            raise ValueError(
                f"{path} is a folder without state.json; expected a Hugging Face "
                "datasets save_to_disk folder"
            )
        yield from _read_saved_dataset(path)
    elif path.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        yield from _read_jsonl(path, log)
    elif path.endswith(".parquet"):
        yield from _read_table(path, pq.read_table(path))
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
