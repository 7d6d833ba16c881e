"""Collation and packing conventions on hand-made token ids (closed forms)."""

import jax
import numpy as np
import pytest

from mio_jax.data import batching
from mio_jax.data.config import default_data_config, validate_data_config
from mio_jax.data.tokenize import TokenizedGroup


def _group(prompt, *completions, weight=1.0):
    return TokenizedGroup(
        "r", np.array(prompt, np.int32), tuple(np.array(c, np.int32) for c in completions), weight
    )


def test_collate_closed_form():
    g = _group([11, 12, 13], [21, 22, 2], [31, 2], weight=0.5)
    b = batching.collate([g, None], np.array([7, 8]), K=2, L=8, pad_id=0)
    assert b.input_ids[0].tolist() == [[11, 12, 13, 21, 22, 2, 0, 0], [11, 12, 13, 31, 2, 0, 0, 0]]
    assert b.targets[0].tolist() == [[12, 13, 21, 22, 2, 0, 0, 0], [12, 13, 31, 2, 0, 0, 0, 0]]
    # The last prompt position (t = 2) predicts the first completion token; EOS is a target.
    assert b.loss_mask[0].tolist() == [[0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0]]
    assert b.positions[0].tolist() == [[0, 1, 2, 3, 4, 5, 0, 0], [0, 1, 2, 3, 4, 0, 0, 0]]
    assert b.attention_mask[0].tolist() == [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    assert b.weights.tolist() == [0.5, 0.0] and b.example_id.tolist() == [7, -1]
    assert b.valid.tolist() == [[True, True], [False, False]]
    assert b.input_ids[1].sum() == 0 and b.loss_mask[1].sum() == 0
    assert b.input_ids.dtype == np.int32 and b.weights.dtype == np.float32
    with pytest.raises(ValueError, match="> L=5"):
        batching.collate([g], np.array([0]), K=2, L=5)


def test_pack_closed_form_and_unpack():
    g0 = _group([11, 12], [21, 2], [22, 23, 2])  # lengths 4, 5
    g1 = _group([13], [24, 2], [25, 2])  # lengths 3, 3
    p = batching.pack([g0, g1], np.array([0, 1]), K=2, R=2, L=8, group_offset=4)
    # First fit decreasing: 5 -> row 0, 4 -> row 1, 3 -> row 0 (5+3=8), 3 -> row 1 (4+3=7).
    assert p.input_ids.tolist() == [[11, 12, 22, 23, 2, 13, 24, 2], [11, 12, 21, 2, 13, 25, 2, 0]]
    assert p.segment_ids.tolist() == [[1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 2, 2, 2, 0]]
    assert p.positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 0]]
    assert p.targets.tolist() == [[12, 22, 23, 2, 0, 24, 2, 0], [12, 21, 2, 0, 25, 2, 0, 0]]
    assert p.loss_mask.tolist() == [[0, 1, 1, 1, 0, 1, 1, 0], [0, 1, 1, 0, 1, 1, 0, 0]]
    assert p.group_index.tolist() == [[4, 4, 4, 4, 4, 5, 5, 5], [4, 4, 4, 4, 5, 5, 5, -1]]
    assert p.slot_index.tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, -1]]
    # Sums come back per (global group - offset handled by the caller's global batch).
    local = batching.PackedBatch(
        **{**vars(p), "group_index": np.where(p.group_index >= 0, p.group_index - 4, -1)}
    )
    values = np.arange(16, dtype=np.float32).reshape(2, 8)
    sums = jax.jit(batching.unpack_sequence_sums)(values, local)
    # Completion tokens: g0 chosen row1 t=1,2 -> 9+10; g0 rejected row0 t=1..3 -> 1+2+3;
    # g1 chosen row0 t=5,6 -> 5+6; g1 rejected row1 t=4,5 -> 12+13.
    np.testing.assert_array_equal(np.asarray(sums), [[19, 6], [11, 25]])
    with pytest.raises(batching.PackingOverflow, match="need 2 packed rows"):
        batching.pack([g0, g1], np.array([0, 1]), K=2, R=1, L=8)


def test_config_validation():
    c = default_data_config()
    validate_data_config(c)
    with pytest.raises(AttributeError):
        c.max_lenght = 3  # locked: typos fail
    for key, bad in (
        ("format", "xml"),
        ("truncation_mode", "middle"),
        ("on_bad_row", "ignore"),
        ("kway_mode", "all"),
    ):
        c = default_data_config()
        c[key] = bad
        with pytest.raises(ValueError, match=key):
            validate_data_config(c)
