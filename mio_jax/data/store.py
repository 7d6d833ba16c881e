"""The groups of a prepared split, in memory or read on demand from the tokenized cache.

Both stores are sequences of ``TokenizedGroup`` (``store[i]``, slices, ``len``) that also
carry the split's **lengths index**, the only per-group data every process holds whole:

  prompt_lengths: ``[N]`` int32 prompt tokens of each group.
  completion_lengths: ``[N, K]`` int32 tokens of each completion slot (0 = no such slot;
    a kept completion has at least one token).

The batch plan, padded lengths, shared-prompt row lengths, packed row counts and token
counts of every global batch come from the index alone; a process reads the tokens of
only the groups of its own share of each batch (``ArrowStore``: random access into
memory-mapped Arrow files, so nothing but the pages it touches is loaded).
"""

import functools
import threading
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from mio_jax.data.tokenize import TokenizedGroup


class _Indexed(Sequence):
    prompt_lengths: np.ndarray
    completion_lengths: np.ndarray

    @functools.cached_property
    def seq_lengths(self) -> np.ndarray:
        """[N] longest sequence (prompt + completion) of each group (computed once)."""
        present = self.completion_lengths > 0
        return np.where(present, self.completion_lengths + self.prompt_lengths[:, None],
                        0).max(axis=1).astype(np.int32)

    def group_seq_lengths(self, i: int) -> list[int]:
        """Tokens of each sequence of group ``i`` (prompt + completion k)."""
        c = self.completion_lengths[i]
        return [int(self.prompt_lengths[i] + n) for n in c if n > 0]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._get(j) for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"group {i} out of range ({len(self)} groups)")
        return self._get(i)

    def __len__(self) -> int:
        return len(self.prompt_lengths)


def lengths_of(groups, K: int) -> tuple[np.ndarray, np.ndarray]:
    """The lengths index of a list of ``TokenizedGroup``."""
    prompt = np.array([len(g.prompt_ids) for g in groups], np.int32)
    completion = np.zeros([len(groups), K], np.int32)
    for i, g in enumerate(groups):
        completion[i, :len(g.completion_ids)] = [len(c) for c in g.completion_ids]
    return prompt, completion


class ListStore(_Indexed):
    """Groups held in memory (a split prepared without the cache)."""

    def __init__(self, groups, K: int):
        self._groups = list(groups)
        self.prompt_lengths, self.completion_lengths = lengths_of(self._groups, K)

    def _get(self, i: int) -> TokenizedGroup:
        return self._groups[i]


class _Part:
    """Zero-copy numpy views of the record batches of one memory-mapped Arrow file."""

    def __init__(self, path: str):
        self.path = path
        self._source = pa.memory_map(path)
        reader = pa.ipc.open_file(self._source)
        self.batches = []
        starts = [0]
        for b in range(reader.num_record_batches):
            rb = reader.get_batch(b)
            prompt = rb.column("prompt_ids")
            comp = rb.column("completion_ids")
            self.batches.append(dict(
                p_off=prompt.offsets.to_numpy(), p_val=prompt.values.to_numpy(),
                c_off=comp.offsets.to_numpy(), t_off=comp.values.offsets.to_numpy(),
                t_val=comp.values.values.to_numpy(), row_id=rb.column("row_id"),
                weight=rb.column("weight").to_numpy(),
                p_cut=rb.column("prompt_truncated"), c_cut=rb.column("completion_truncated")))
            starts.append(starts[-1] + rb.num_rows)
        self.starts = np.array(starts, np.int64)

    def group(self, pos: int) -> TokenizedGroup:
        b = int(np.searchsorted(self.starts, pos, side="right")) - 1
        d, j = self.batches[b], pos - int(self.starts[b])
        c0, c1 = d["c_off"][j], d["c_off"][j + 1]
        t = d["t_off"]
        return TokenizedGroup(
            row_id=d["row_id"][j].as_py(),
            prompt_ids=d["p_val"][d["p_off"][j]:d["p_off"][j + 1]],
            completion_ids=tuple(d["t_val"][t[k]:t[k + 1]] for k in range(c0, c1)),
            weight=float(d["weight"][j]),
            prompt_truncated=bool(d["p_cut"][j].as_py()),
            completion_truncated=bool(d["c_cut"][j].as_py()))


class ArrowStore(_Indexed):
    """Groups read on demand from the tokenized cache's part files.

    Args:
      files: local paths of the part files (memory-mapped when first read).
      part: ``[N]`` part of each group, in split order; pos: ``[N]`` its row in the part.
      prompt_lengths, completion_lengths: the lengths index (module docstring).

    Picklable (for grain's worker processes): the files are mapped again on first use.
    """

    def __init__(self, files, part, pos, prompt_lengths, completion_lengths):
        self.files = list(files)
        self.part, self.pos = part, pos
        self.prompt_lengths, self.completion_lengths = prompt_lengths, completion_lengths
        self._parts = [None] * len(self.files)
        self._lock = threading.Lock()  # grain assembles batches in threads

    def _get(self, i: int) -> TokenizedGroup:
        p = int(self.part[i])
        if self._parts[p] is None:
            with self._lock:
                if self._parts[p] is None:
                    self._parts[p] = _Part(self.files[p])
        return self._parts[p].group(int(self.pos[i]))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_parts"], state["_lock"] = [None] * len(self.files), None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
