"""Sources: JSONL (+gzip), Parquet, save_to_disk folders, lists, globs."""

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mio_jax.data import report, sources

ROWS = [
    {"prompt": "What is 2 + 3?", "chosen": " 5.", "rejected": " 6."},
    {"prompt": "Name a colour.", "chosen": " Blue.", "rejected": " Seven."},
]
# Written by `datasets` 5.2.0 `Dataset.from_dict(...).save_to_disk` (see assets/README.md).
SAVED = os.path.join(os.path.dirname(__file__), "assets", "hf_saved_explicit")


def _read(spec, **kw):
    log = report.BadRowLog(policy="skip")
    return list(sources.read_rows(spec, log, **kw)), log


def test_jsonl_plain_and_gzip_with_line_ids(tmp_path):
    text = json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n"
    (tmp_path / "a.jsonl").write_text(text)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(text)
    for name in ("a.jsonl", "b.jsonl.gz"):
        rows, _ = _read(str(tmp_path / name))
        assert [r for _, r in rows] == ROWS
        assert [i for i, _ in rows] == [f"{tmp_path / name}:1", f"{tmp_path / name}:3"]


def test_parquet(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    rows, _ = _read(str(tmp_path / "d.parquet"))
    assert [r for _, r in rows] == ROWS
    assert rows[1][0] == f"{tmp_path / 'd.parquet'}[1]"


def test_saved_to_disk_folder():
    rows, _ = _read(SAVED)
    assert [r for _, r in rows] == ROWS
    assert rows[0][0] == f"{SAVED}[0]"


def test_dataset_dict_folder_names_the_splits(tmp_path):
    (tmp_path / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    (tmp_path / "state.json").write_text("{}")
    with pytest.raises(ValueError, match="DatasetDict.*train"):
        _read(str(tmp_path))


def test_glob_list_and_in_memory(tmp_path):
    for i, row in enumerate(ROWS):
        (tmp_path / f"part{i}.jsonl").write_text(json.dumps(row) + "\n")
    rows, _ = _read(str(tmp_path / "part*.jsonl"))
    assert [r for _, r in rows] == ROWS
    rows, _ = _read([str(tmp_path / "part1.jsonl"), str(tmp_path / "part0.jsonl")])
    assert [r for _, r in rows] == ROWS[::-1]
    rows, _ = _read(ROWS)
    assert [i for i, _ in rows] == ["rows[0]", "rows[1]"]
    rows, _ = _read(ROWS * 3, max_rows=4)
    assert len(rows) == 4


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        _read(str(tmp_path / "nothing.jsonl"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        _read(str(tmp_path / "*.parquet"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown file type"):
        _read(str(tmp_path / "x.csv"))
