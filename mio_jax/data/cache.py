"""The tokenized cache: a prepared split written once, read by every process and restart.

Layout, under ``<cache_dir>/<split>-<fingerprint[:20]>/`` (local or a URL such as
``gs://``; ``cache_dir`` defaults to ``<workdir>/data_cache``):

  part-00000-of-00004.arrow ...  Arrow IPC files (uncompressed, memory-mappable), one
      record batch per ``BATCH`` groups: ``row_index`` (the source row), ``row_id``,
      ``prompt_ids``, ``completion_ids`` (a list of lists), ``weight``, the truncation
      flags, and the lengths columns ``prompt_len`` / ``completion_lens``. The schema
      metadata carries the fingerprint and the part number.
  manifest.json  written last: fingerprint, version, format, K, each part's file name,
      bytes and group count, each part's ``PartStats``, and the combined summary.

The fingerprint hashes the data files (path, size, modification time), the tokenizer
(its whole serialised vocabulary and merges, the chat template, special token ids),
every data setting that changes preparation, and ``VERSION``. A changed fingerprint is a
new folder (the old one is left as it is); a folder whose manifest or part files do not
match (truncated, foreign, unreadable) is rebuilt in place, with a warning naming the file.

Building with P processes: process p tokenises the source rows ``n % P == p`` (JSONL lines
it does not own are not even parsed) and writes part p; the processes then agree (one
all-gather) and every process checks that it sees every part; a process that does not (a
cache folder on each host's own disk) builds the missing parts itself, with no further
communication. Every decision to build is taken by all processes together.

Reading: each process memory-maps the parts (a remote cache is first staged on local disk,
``paths.local_copy``) and loads only the lengths index; the groups are read on demand
(``mio_jax.data.store.ArrowStore``).
"""

import hashlib
import json
import logging
import os
import tempfile

import jax
import numpy as np
import pyarrow as pa
from jax.experimental import multihost_utils

from mio_jax import distributed, paths
from mio_jax.data import preparation as prep
from mio_jax.data import report, sources
from mio_jax.data.store import ArrowStore
from mio_jax.errors import InputError

VERSION = 2  # 2: PartStats hold their counts as a DataSummary
BATCH = 8192  # groups per record batch
MANIFEST = "manifest.json"
# Data settings that change what preparation produces (the rest act on batches).
SETTINGS = ("format", "max_length", "max_prompt_length", "truncation_mode", "on_bad_row",
            "kway_mode", "num_negatives", "system_prompt", "max_rows")

SCHEMA = pa.schema([
    ("row_index", pa.int64()),
    ("row_id", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("completion_ids", pa.list_(pa.list_(pa.int32()))),
    ("weight", pa.float32()),
    ("prompt_truncated", pa.bool_()),
    ("completion_truncated", pa.bool_()),
    ("prompt_len", pa.int32()),
    ("completion_lens", pa.list_(pa.int32())),
])


class CacheError(InputError):
    """A cache folder that cannot be used (the message names the file and what is wrong)."""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = {
        "class": type(tokenizer).__name__,
        "vocab": _sha(backend.to_str().encode()) if backend is not None else
        _sha(json.dumps(sorted(tokenizer.get_vocab().items())).encode()),
        "chat_template": getattr(tokenizer, "chat_template", None) or "",
        "special": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
    }
    return _sha(json.dumps(parts, sort_keys=True, default=str).encode())


def source_fingerprint(source) -> list:
    """What the fingerprint records of the source: each file's path, size and mtime (for
    a save_to_disk folder, of each file in it); in-memory rows are hashed whole."""
    if isinstance(source, (list, tuple)) and source and not isinstance(source[0], (str, os.PathLike)):
        return [_sha(json.dumps(list(source), sort_keys=True, default=str).encode())]
    out = []
    for path in sources.expand_paths(source):
        if paths.isdir(path):
            out.extend(paths.stat_fingerprint(paths.join(path, name))
                       for name in paths.listdir(path))
        else:
            out.append(paths.stat_fingerprint(path))
    return out


def fingerprint(data_config, tokenizer, split: str, source) -> str:
    key = {"version": VERSION, "split": split, "source": source_fingerprint(source),
           "tokenizer": tokenizer_fingerprint(tokenizer),
           "settings": {k: data_config[k] for k in SETTINGS}}
    return _sha(json.dumps(key, sort_keys=True, default=str).encode())


def _part_name(p: int, n: int) -> str:
    return f"part-{p:05d}-of-{n:05d}.arrow"


def _record_batch(rows, groups) -> pa.RecordBatch:
    def lists(arrays, dtype=np.int32):
        offsets = np.zeros(len(arrays) + 1, np.int32)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        values = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))

    completions = [c for g in groups for c in g.completion_ids]
    outer = np.zeros(len(groups) + 1, np.int32)
    np.cumsum([len(g.completion_ids) for g in groups], out=outer[1:])
    return pa.record_batch([
        pa.array(np.asarray(rows, np.int64)),
        pa.array([g.row_id for g in groups], pa.string()),
        lists([np.asarray(g.prompt_ids) for g in groups]),
        pa.ListArray.from_arrays(pa.array(outer), lists([np.asarray(c) for c in completions])),
        pa.array(np.array([g.weight for g in groups], np.float32)),
        pa.array([bool(g.prompt_truncated) for g in groups]),
        pa.array([bool(g.completion_truncated) for g in groups]),
        pa.array(np.array([len(g.prompt_ids) for g in groups], np.int32)),
        lists([np.array([len(c) for c in g.completion_ids], np.int32) for g in groups]),
    ], schema=SCHEMA)


class PartWriter:
    """Streams the groups of one part into its Arrow file, ``BATCH`` at a time, so a
    build holds at most one record batch of groups; ``close()`` lands the file atomically
    (local: a temporary name renamed over it; remote: one upload) and returns its bytes.
    ``abort()`` removes the temporary file (ours) and lands nothing."""

    def __init__(self, path: str, *, fp: str, part: int):
        self.path, self._remote = path, paths.is_remote(path)
        schema = SCHEMA.with_metadata({"mio_jax.fingerprint": fp, "mio_jax.part": str(part),
                                       "mio_jax.version": str(VERSION)})
        if self._remote:
            fd, self._tmp = tempfile.mkstemp(suffix=".arrow")
            os.close(fd)
        else:
            paths.makedirs(paths.dirname(path))
            self._tmp = f"{path}.tmp-{os.getpid()}"
        self._sink = pa.OSFile(self._tmp, "wb")
        self._writer = pa.ipc.new_file(self._sink, schema)
        self._rows, self._groups = [], []

    def add(self, row: int, group) -> None:
        self._rows.append(row)
        self._groups.append(group)
        if len(self._groups) >= BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._groups:
            self._writer.write_batch(_record_batch(self._rows, self._groups))
            self._rows, self._groups = [], []

    def _finish(self) -> None:
        self._writer.close()
        self._sink.close()

    def close(self) -> int:
        self._flush()
        self._finish()
        size = os.path.getsize(self._tmp)
        if self._remote:
            paths.upload(self._tmp, self.path)
            os.remove(self._tmp)  # our own temporary file
        else:
            os.replace(self._tmp, self.path)
        return size

    def abort(self) -> None:
        self._finish()
        os.remove(self._tmp)


def _check_part(path: str, *, fp: str, part: int, size: int, groups: int) -> str:
    """'' when the part file matches the manifest, else what is wrong with it."""
    if not paths.exists(path):
        return f"{path} is missing"
    actual = paths.size(path)
    if actual != size:
        return f"{path} has {actual} bytes, the manifest says {size} (truncated or replaced)"
    try:
        local = paths.local_copy(path)
        with pa.memory_map(local) as source:
            reader = pa.ipc.open_file(source)
            meta = {k.decode(): v.decode() for k, v in (reader.schema.metadata or {}).items()}
            rows = sum(reader.get_batch(b).num_rows for b in range(reader.num_record_batches))
    except (pa.ArrowInvalid, OSError) as e:
        return f"{path} is not a readable Arrow file ({e})"
    if meta.get("mio_jax.fingerprint") != fp or meta.get("mio_jax.part") != str(part):
        return f"{path} belongs to another cache (fingerprint or part number differ)"
    if rows != groups:
        return f"{path} holds {rows} groups, the manifest says {groups}"
    return ""


def check(folder: str, fp: str) -> tuple[dict | None, str]:
    """``(manifest, "")`` when the cache folder is complete and matches ``fp``, else
    ``(None, reason)`` (reason "" when there is simply no cache yet)."""
    manifest_path = paths.join(folder, MANIFEST)
    if not paths.exists(manifest_path):
        return None, ""
    try:
        manifest = paths.read_json(manifest_path)
    except (ValueError, OSError) as e:
        return None, f"{manifest_path} is unreadable ({e})"
    if manifest.get("fingerprint") != fp or manifest.get("version") != VERSION:
        return None, f"{manifest_path} belongs to another cache (fingerprint or version differ)"
    for i, part in enumerate(manifest.get("parts", [])):
        reason = _check_part(paths.join(folder, part["file"]), fp=fp, part=i,
                             size=part["bytes"], groups=part["groups"])
        if reason:
            return None, reason
    return manifest, ""


def _gather_stats(stats: prep.PartStats, size: int) -> list[tuple[dict, int]]:
    """Every process's part stats and part size (one all-gather of a JSON buffer)."""
    if jax.process_count() == 1:
        return [(stats.to_dict(), size)]
    raw = json.dumps({"stats": stats.to_dict(), "bytes": size}).encode()
    n = np.asarray(multihost_utils.process_allgather(np.array([len(raw)], np.int64)))
    buf = np.zeros(int(n.max()), np.uint8)
    buf[:len(raw)] = np.frombuffer(raw, np.uint8)
    bufs = np.asarray(multihost_utils.process_allgather(buf))
    out = [json.loads(bytes(b[:int(k)]).decode()) for b, k in zip(bufs, n.reshape(-1))]
    return [(d["stats"], d["bytes"]) for d in out]


def build(data_config, tokenizer, *, split: str, source, folder: str, fp: str) -> dict:
    """Builds the cache folder, split across the processes; returns its manifest."""
    P, p = jax.process_count(), jax.process_index()
    fmt, first = prep.detect_format(data_config, source)

    def make(q: int) -> tuple[prep.PartStats, int]:
        writer = PartWriter(paths.join(folder, _part_name(q, P)), fp=fp, part=q)
        try:
            _, _, stats = prep.tokenize_part(data_config, tokenizer, source, fmt=fmt,
                                             first=first, select=lambda n: n % P == q,
                                             emit=writer.add)
        except BaseException:
            writer.abort()
            raise
        if stats.error:
            writer.abort()
            return stats, 0
        return stats, writer.close()

    mine = make(p)
    gathered = _gather_stats(*mine)  # also the point where every part has been written
    parts = [prep.PartStats.from_dict(s) for s, _ in gathered]
    error = prep.first_error(parts)
    if error:
        raise report.BadRowError(error)
    # A cache folder on each host's own disk: build what this process cannot see.
    for q, (_, size) in enumerate(gathered):
        path = paths.join(folder, _part_name(q, P))
        if q != p and (not paths.exists(path) or paths.size(path) != size):
            logging.warning("data cache: %s is not visible to process %d (is %s on a disk "
                            "of its own?); building that part here", path, p, folder)
            gathered[q] = (gathered[q][0], make(q)[1])
    summary = prep.combine(parts, split)
    manifest = {
        "version": VERSION, "fingerprint": fp, "split": split, "format": summary.format,
        "K": prep.num_slots(data_config, summary.format),
        "parts": [{"file": _part_name(q, P), "bytes": size, "groups": s.counts.groups}
                  for q, ((_, size), s) in enumerate(zip(gathered, parts))],
        "stats": [s.to_dict() for s in parts],
        "summary": summary.to_dict(),
    }
    if p == 0 or not paths.exists(paths.join(folder, MANIFEST)):
        paths.write_json(paths.join(folder, MANIFEST), manifest, indent=1)
    return manifest


def open_store(folder: str, manifest: dict) -> ArrowStore:
    """The split's groups from a checked cache folder: its lengths index in memory, the
    tokens memory-mapped."""
    files, part, pos, row, plen, clen = [], [], [], [], [], []
    K = int(manifest["K"])
    for q, entry in enumerate(manifest["parts"]):
        local = paths.local_copy(paths.join(folder, entry["file"]))
        files.append(local)
        with pa.memory_map(local) as source:
            reader = pa.ipc.open_file(source)
            for b in range(reader.num_record_batches):
                rb = reader.get_batch(b)
                n = rb.num_rows
                lens = rb.column("completion_lens")
                off, val = lens.offsets.to_numpy(), lens.values.to_numpy()
                c = np.zeros([n, K], np.int32)
                counts = np.diff(off)
                slot = np.arange(len(val)) - np.repeat(off[:-1], counts)
                c[np.repeat(np.arange(n), counts), slot] = val[off[0]:off[-1]]
                clen.append(c)
                plen.append(rb.column("prompt_len").to_numpy().copy())
                row.append(rb.column("row_index").to_numpy().copy())
                part.append(np.full(n, q, np.int32))
        pos.append(np.arange(entry["groups"], dtype=np.int64))
    order = np.argsort(np.concatenate(row), kind="stable")
    return ArrowStore(files, np.concatenate(part)[order], np.concatenate(pos)[order],
                      np.concatenate(plen)[order], np.concatenate(clen)[order])


def load_or_build(data_config, tokenizer, *, split: str, source, cache_dir: str):
    """The prepared split from the cache (building it first when needed); collective:
    every process of the run calls it with the same arguments.

    Returns:
      ``PreparedSplit`` whose groups are an ``ArrowStore``.
    """
    fp = fingerprint(data_config, tokenizer, split, source)
    folder = paths.join(paths.resolve(cache_dir), f"{split}-{fp[:20]}")
    manifest, reason = check(folder, fp)
    if not distributed.all_true(manifest is not None):
        if reason:
            logging.warning("data cache: %s; rebuilding %s", reason, folder)
        logging.info("data cache: building %s (%d process(es))", folder, jax.process_count())
        manifest = build(data_config, tokenizer, split=split, source=source, folder=folder,
                         fp=fp)
        # Every process checks what it will read (a broken upload shows here, not later).
        manifest, reason = check(folder, fp)
        if not distributed.all_true(manifest is not None):
            raise CacheError(f"data cache: {reason or 'another process cannot read it'} "
                             f"right after building {folder}")
    else:
        logging.info("data cache: hit %s", folder)
    summary = report.DataSummary.from_dict(manifest["summary"])
    prep.check_usable(summary, source)
    return prep.PreparedSplit(open_store(folder, manifest), int(manifest["K"]), summary,
                              cache_path=folder)
