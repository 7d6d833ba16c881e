"""The tokenized cache: hit, stale fingerprint, truncated / foreign files, bad rows, reading
on demand equal to the in-memory split, gs:// through the local GCS emulator."""

import json
import logging
import os
import pickle
import shutil

import jax
import numpy as np
import pytest

from mio_jax import testing
from mio_jax.data import cache, config as data_config_lib, pipeline, preparation, report

logging.getLogger("gcsfs").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("cache_data"))
    return testing.write_tiny_data(os.path.join(d, "train.jsonl"), 40, seed=3)


@pytest.fixture(scope="module")
def tok():
    return testing.tiny_tokenizer()


def _config(train, **kw):
    c = data_config_lib.default_data_config()
    with c.unlocked():
        c.train_path = train
        for k, v in kw.items():
            c[k] = v
    return c


def _same_groups(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.row_id == y.row_id and x.weight == y.weight
        assert (x.prompt_truncated, x.completion_truncated) == (y.prompt_truncated,
                                                                y.completion_truncated)
        np.testing.assert_array_equal(x.prompt_ids, y.prompt_ids)
        assert len(x.completion_ids) == len(y.completion_ids)
        for p, q in zip(x.completion_ids, y.completion_ids):
            np.testing.assert_array_equal(p, q)


def _no_tokenizing(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("tokenised although the cache should have been hit")

    monkeypatch.setattr(preparation, "tokenize_part", fail)


def test_cache_hit_reads_what_memory_prepares(files, tok, tmp_path, monkeypatch):
    c = _config(files)
    memory = pipeline.prepare(c, tok, split="train")
    built = pipeline.prepare(c, tok, split="train", cache_dir=str(tmp_path))
    assert built.cache_path.startswith(str(tmp_path)) and memory.cache_path is None
    assert sorted(os.listdir(built.cache_path)) == ["manifest.json", "part-00000-of-00001.arrow"]
    _no_tokenizing(monkeypatch)
    hit = pipeline.prepare(c, tok, split="train", cache_dir=str(tmp_path))
    assert hit.summary == built.summary == memory.summary and hit.K == memory.K == 2
    _same_groups(hit.groups, memory.groups)
    np.testing.assert_array_equal(hit.groups.prompt_lengths, memory.groups.prompt_lengths)
    np.testing.assert_array_equal(hit.groups.completion_lengths,
                                  memory.groups.completion_lengths)
    np.testing.assert_array_equal(hit.seq_lengths, memory.seq_lengths)
    # picklable for grain's worker processes, and equal after the round trip
    _same_groups(pickle.loads(pickle.dumps(hit.groups))[:5], memory.groups[:5])


@pytest.mark.parametrize("layout", [{}, {"packing": True}, {"shared_prompt": True},
                                    {"bucketing": False}])
def test_batches_from_the_cache_equal_batches_from_memory(files, tok, tmp_path, layout):
    c = _config(files, **layout)
    memory = pipeline.prepare(c, tok, split="train")
    cached = pipeline.prepare(c, tok, split="train", cache_dir=str(tmp_path))
    for p in range(2):  # each process's share of a 2-process run
        its = [pipeline.make_pipeline(c, tok, batch_size=8, seed=5, prepared=s,
                                      process_index=p, process_count=2)
               for s in (memory, cached)]
        for _ in range(8):
            (a, ia), (b, ib) = (it.next_with_info() for it in its)
            assert type(a) is type(b)
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
                np.testing.assert_array_equal(x, y)
            assert (ia.tokens, ia.seq_len, ia.mask_shape) == (ib.tokens, ib.seq_len, ib.mask_shape)
            np.testing.assert_array_equal(ia.completion_tokens, ib.completion_tokens)


def test_a_changed_input_or_setting_builds_a_new_cache_and_leaves_the_old(files, tok,
                                                                          tmp_path):
    c = _config(files)
    first = pipeline.prepare(c, tok, split="train", cache_dir=str(tmp_path)).cache_path
    # a setting that changes preparation
    longer = pipeline.prepare(_config(files, max_length=64), tok, split="train",
                                 cache_dir=str(tmp_path)).cache_path
    # one that acts on batches only: same cache
    same = pipeline.prepare(_config(files, bucketing=False), tok, split="train",
                               cache_dir=str(tmp_path)).cache_path
    # the tokenizer (one more vocabulary entry)
    other_tok = pipeline.prepare(c, testing.tiny_tokenizer(testing.VOCAB + 1),
                                    split="train", cache_dir=str(tmp_path)).cache_path
    # the data file itself
    data = str(tmp_path / "copy.jsonl")
    shutil.copy(files, data)
    before = pipeline.prepare(_config(data), tok, split="train", cache_dir=str(tmp_path))
    with open(data, "a", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "q: 1+1=", "chosen": " 2.", "rejected": " 3."}) + "\n")
    after = pipeline.prepare(_config(data), tok, split="train", cache_dir=str(tmp_path))
    assert same == first
    assert len({first, longer, other_tok, before.cache_path, after.cache_path}) == 5
    assert len(after.groups) == len(before.groups) + 1
    assert os.path.exists(os.path.join(first, "manifest.json"))  # the old folders remain


def test_a_truncated_part_is_detected_and_rebuilt(files, tok, tmp_path, caplog):
    c = _config(files)
    built = pipeline.prepare(c, tok, split="train", cache_dir=str(tmp_path))
    part = os.path.join(built.cache_path, "part-00000-of-00001.arrow")
    size = os.path.getsize(part)
    with open(part, "r+b") as f:
        f.truncate(size // 2)
    with caplog.at_level(logging.WARNING):
        again = pipeline.prepare(c, tok, split="train", cache_dir=str(tmp_path))
    assert "truncated" in caplog.text and part in caplog.text and "rebuilding" in caplog.text
    assert os.path.getsize(part) == size
    _same_groups(again.groups, built.groups)


def test_a_foreign_part_of_the_same_size_is_detected_and_rebuilt(files, tok, tmp_path,
                                                                 caplog):
    c = _config(files)
    mine = pipeline.prepare(c, tok, split="train", cache_dir=str(tmp_path / "a"))
    part = os.path.join(mine.cache_path, "part-00000-of-00001.arrow")
    # Another cache's part file (another fingerprint) put in its place, manifest patched
    # to its size: only the file's own metadata tells.
    other = pipeline.prepare(_config(files, system_prompt="x"), tok, split="train",
                                cache_dir=str(tmp_path / "b"))
    shutil.copy(os.path.join(other.cache_path, "part-00000-of-00001.arrow"), part)
    manifest_path = os.path.join(mine.cache_path, "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["parts"][0]["bytes"] = os.path.getsize(part)
    json.dump(manifest, open(manifest_path, "w"))
    with caplog.at_level(logging.WARNING):
        again = pipeline.prepare(c, tok, split="train", cache_dir=str(tmp_path / "a"))
    assert "belongs to another cache" in caplog.text
    _same_groups(again.groups, mine.groups)


def test_an_unreadable_manifest_is_rebuilt(files, tok, tmp_path, caplog):
    c = _config(files)
    built = pipeline.prepare(c, tok, split="train", cache_dir=str(tmp_path))
    with open(os.path.join(built.cache_path, "manifest.json"), "w") as f:
        f.write('{"version": 1, "finger')
    with caplog.at_level(logging.WARNING):
        again = pipeline.prepare(c, tok, split="train", cache_dir=str(tmp_path))
    assert "unreadable" in caplog.text
    assert again.summary == built.summary


def test_bad_rows_through_the_cache_count_and_fail_as_in_memory(tok, tmp_path):
    path = str(tmp_path / "bad.jsonl")
    rows = [{"prompt": "q: 1+2=", "chosen": " 3.", "rejected": " 4."},
            {"prompt": "q: 2+2=", "chosen": " 4.", "rejected": " 4."},  # identical
            "not json {", {"prompt": "q: 3+3=", "chosen": " 6."},  # missing field
            {"prompt": "q: 5+5=", "chosen": " 10.", "rejected": " 11."}]
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    skip = _config(path, on_bad_row="skip")
    memory = pipeline.prepare(skip, tok, split="train")
    cached = pipeline.prepare(skip, tok, split="train", cache_dir=str(tmp_path / "c"))
    assert cached.summary == memory.summary
    assert memory.summary.rows_read == 5 and memory.summary.rows_used == 2
    assert memory.summary.rows_dropped == 3
    _same_groups(cached.groups, memory.groups)
    error = _config(path, on_bad_row="error")
    with pytest.raises(report.BadRowError) as in_memory:
        pipeline.prepare(error, tok, split="train")
    with pytest.raises(report.BadRowError) as through_cache:
        pipeline.prepare(error, tok, split="train", cache_dir=str(tmp_path / "e"))
    assert str(in_memory.value) == str(through_cache.value)
    assert f"{path}:2" in str(through_cache.value)
    assert not os.path.exists(os.path.join(str(tmp_path / "e"), "manifest.json"))


def test_a_cache_in_a_gs_bucket_is_built_once_and_hit(files, tok, tmp_path, monkeypatch):
    monkeypatch.setenv("MIO_JAX_STAGING", str(tmp_path / "staging"))
    with testing.GcsEmulator() as emu:
        url = f"gs://{emu.bucket}/shared/data_cache"
        c = _config(files)
        built = pipeline.prepare(c, tok, split="train", cache_dir=url)
        assert built.cache_path.startswith(url)
        from mio_jax import paths

        assert paths.listdir(built.cache_path) == ["manifest.json", "part-00000-of-00001.arrow"]
        with monkeypatch.context() as m:
            _no_tokenizing(m)
            hit = pipeline.prepare(c, tok, split="train", cache_dir=url)
        _same_groups(hit.groups, pipeline.prepare(c, tok, split="train").groups)
        assert hit.summary == built.summary


def test_part_files_hold_the_lengths_columns(files, tok, tmp_path):
    built = pipeline.prepare(_config(files), tok, split="train", cache_dir=str(tmp_path))
    import pyarrow as pa

    with pa.memory_map(os.path.join(built.cache_path, "part-00000-of-00001.arrow")) as src:
        table = pa.ipc.open_file(src).read_all()
    meta = table.schema.metadata
    assert meta[b"mio_jax.fingerprint"].decode() == json.load(
        open(os.path.join(built.cache_path, "manifest.json")))["fingerprint"]
    assert table.column("prompt_len").to_pylist() == [len(g.prompt_ids) for g in built.groups]
    assert table.column("completion_lens").to_pylist() == [
        [len(c) for c in g.completion_ids] for g in built.groups]
    assert cache.SCHEMA.names == table.schema.names
