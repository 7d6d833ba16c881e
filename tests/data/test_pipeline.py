"""Pipeline: epochs, shuffle, bucketing, packing, exact resume, multi-process shares."""

import json

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mio_jax.data import batching, pipeline
from mio_jax.data.config import default_data_config

B = 8


def _config(**kw):
    c = default_data_config()
    c.max_rows = 100
    for k, v in kw.items():
        c[k] = v
    return c


@pytest.fixture(scope="module")
def prepared(smollm2):
    return pipeline.prepare(_config(), smollm2, split="train")


def _pipe(prepared, tok, *, seed=3, process_index=0, process_count=1, split="train",
          micro_batches=1, **kw):
    return pipeline.make_pipeline(
        _config(**kw),
        tok,
        split=split,
        batch_size=B,
        seed=seed,
        prepared=prepared,
        process_index=process_index,
        process_count=process_count,
        micro_batches=micro_batches,
    )


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert type(a) is type(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_epochs_cover_every_group_once_and_reshuffle(prepared, smollm2):
    n = len(prepared.groups)
    assert n == 100 and prepared.summary.rows_used == 100
    it = _pipe(prepared, smollm2, bucketing=False)
    steps = n // B  # 12 full batches, 4 groups left over each epoch
    assert it.steps_per_epoch == steps and it.groups_unused_per_epoch == 4
    epochs = [np.concatenate([b.example_id for b in _take(it, steps)]) for _ in range(2)]
    for ids in epochs:
        assert len(set(ids.tolist())) == steps * B and ids.min() >= 0 and ids.max() < n
    assert epochs[0].tolist() != epochs[1].tolist()
    same_seed = np.concatenate(
        [b.example_id for b in _take(_pipe(prepared, smollm2, bucketing=False), steps)]
    )
    assert same_seed.tolist() == epochs[0].tolist()
    other = np.concatenate(
        [b.example_id for b in _take(_pipe(prepared, smollm2, seed=4, bucketing=False), steps)]
    )
    assert other.tolist() != epochs[0].tolist()


def test_batch_contents_and_static_length_without_bucketing(prepared, smollm2):
    batch = next(_pipe(prepared, smollm2, bucketing=False))
    assert batch.input_ids.shape == (B, 2, 256) and batch.weights.tolist() == [1.0] * B
    assert batch.valid.all()
    for b, i in enumerate(batch.example_id):
        g = prepared.groups[i]
        for k in range(2):
            seq = np.concatenate([g.prompt_ids, g.completion_ids[k]])
            np.testing.assert_array_equal(batch.input_ids[b, k, : len(seq)], seq)
            assert batch.loss_mask[b, k].sum() == len(g.completion_ids[k])
            assert (batch.input_ids[b, k, len(seq) :] == 0).all()


def test_bucketing_cuts_padding(prepared, smollm2):
    flat = _take(_pipe(prepared, smollm2, bucketing=False), 12)
    bucketed = _take(_pipe(prepared, smollm2, bucketing=True), 12)
    assert {b.input_ids.shape[-1] for b in bucketed} <= {96, 128, 160, 192, 224, 256}
    for b in bucketed:  # padded to the longest sequence rounded up to 32
        longest = b.attention_mask.sum(-1).max()
        assert b.input_ids.shape[-1] == -(-longest // 32) * 32
    padded = lambda bs: sum(b.attention_mask.size for b in bs)
    assert sorted(np.concatenate([b.example_id for b in bucketed]).tolist()) != list(range(96))
    assert padded(bucketed) < 0.8 * padded(flat)


def test_eval_split_one_ordered_pass_with_padded_last_batch(prepared, smollm2):
    batches = list(_pipe(prepared, smollm2, split="eval", bucketing=False))
    assert len(batches) == 13
    ids = np.concatenate([b.example_id for b in batches])
    assert ids[:100].tolist() == list(range(100)) and ids[100:].tolist() == [-1] * 4
    bucketed = np.concatenate([b.example_id for b in _pipe(prepared, smollm2, split="eval")])
    assert sorted(bucketed.tolist()) == [-1] * 4 + list(range(100))
    last = batches[-1]
    assert last.weights.tolist() == [1.0] * 4 + [0.0] * 4
    assert not last.valid[4:].any() and last.attention_mask[4:].sum() == 0


@pytest.mark.parametrize("packing", [False, True])
def test_resume_equals_uninterrupted_with_orbax(prepared, smollm2, tmp_path, packing):
    kw = dict(packing=packing, num_epochs=0)
    reference = _take(_pipe(prepared, smollm2, **kw), 30)  # crosses two epoch boundaries
    first = _pipe(prepared, smollm2, **kw)
    head = _take(first, 17)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    mngr.save(17, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(first)))
    mngr.wait_until_finished()
    fresh = _pipe(prepared, smollm2, **kw)
    mngr.restore(17, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    tail = _take(fresh, 13)
    for a, b in zip(reference, head + tail):
        _assert_same(a, b)
    state = json.loads(json.dumps(first.get_state()))
    assert state == {"next_index": 17}


def test_two_processes_read_their_shares_and_resume(prepared, smollm2):
    reference = _take(_pipe(prepared, smollm2), 20)
    shares = []
    for p in range(2):
        it = _pipe(prepared, smollm2, process_index=p, process_count=2)
        head = _take(it, 7)
        resumed = _pipe(prepared, smollm2, process_index=p, process_count=2)
        resumed.set_state(it.get_state())
        shares.append(head + _take(resumed, 13))
    for ref, b0, b1 in zip(reference, *shares):
        assert b0.input_ids.shape == (B // 2, 2, ref.input_ids.shape[-1])  # same L on both
        _assert_same(ref, jax.tree.map(lambda x, y: np.concatenate([x, y]), b0, b1))


def test_packing_matches_unpacked_sums(prepared, smollm2):
    packed_it = _pipe(prepared, smollm2, packing=True, max_length=512)
    packed = _take(packed_it, 3)
    R = packed_it.assembler.pack_rows_local
    assert R <= B  # at least two sequences per row on average
    for p in packed:
        groups = [prepared.groups[i] for i in p.example_id]
        u = batching.collate(groups, p.example_id, K=2, L=256)
        assert p.input_ids.shape == (R, 512)
        # Positions restart in each segment; targets never cross a segment.
        seg = p.segment_ids
        starts = (seg > 0) & (np.pad(seg, ((0, 0), (1, 0)))[:, :-1] != seg)
        assert (p.positions[starts] == 0).all()
        assert p.attention_mask.sum() == u.attention_mask.sum()
        value = lambda b: (b.targets % 97) * 0.01 + b.positions * 0.001
        want = (value(u) * u.loss_mask).sum(-1)
        got = batching.unpack_sequence_sums(value(p), p)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
        lengths = batching.unpack_sequence_sums(
            np.ones(p.input_ids.shape, np.float32), p, mask_rl=p.attention_mask
        )
        np.testing.assert_array_equal(np.asarray(lengths), u.attention_mask.sum(-1))


def test_packing_overflow_is_a_clear_error(prepared, smollm2):
    it = _pipe(prepared, smollm2, packing=True, pack_rows=2)
    with pytest.raises(Exception, match="raise data.pack_rows"):
        next(it)


def test_global_arrays_two_processes_packed(prepared, smollm2):
    """Process shares assembled into global arrays give the single-process sums."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    single = next(_pipe(prepared, smollm2, packing=True, pack_rows=16))
    shares = [
        next(_pipe(prepared, smollm2, packing=True, pack_rows=16, process_index=p, process_count=2))
        for p in range(2)
    ]
    # Simulate the two hosts' local data on one host: concatenate, then shard.
    both = jax.tree.map(lambda x, y: np.concatenate([x, y]), *shares)
    glob = pipeline.to_global_arrays(both, sharding)
    assert glob.input_ids.sharding.spec == jax.sharding.PartitionSpec("data")
    assert glob.input_ids.shape == (16, 256) and glob.weights.shape == (B,)
    value = lambda b: (b.targets % 97) * 0.01
    got = jax.jit(batching.unpack_sequence_sums)(value(glob), glob)
    want = batching.unpack_sequence_sums(value(single), single)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    assert (np.asarray(glob.group_index)[8:] >= B // 2).sum() > 0  # global group indices


def test_worker_processes_give_identical_batches(prepared, smollm2):
    serial = _take(_pipe(prepared, smollm2), 4)
    it = _pipe(prepared, smollm2, num_workers=2)
    try:
        parallel = _take(it, 4)
    finally:
        it.close()
    for a, b in zip(serial, parallel):
        _assert_same(a, b)


def test_packing_per_micro_batch_keeps_whole_groups(prepared, smollm2):
    """With the step's micro-batches (train.grad_accum_steps) the packed rows come per
    micro-batch: row r holds only groups b with b % A == r % A, the row count is a multiple
    of A, and the sums per sequence are those of the unpacked groups."""
    a = 2
    it = _pipe(prepared, smollm2, packing=True, max_length=512, micro_batches=a)
    assert it.assembler.pack_rows_local % a == 0
    for p in _take(it, 3):
        gi = np.asarray(p.group_index)
        for r in range(gi.shape[0]):
            assert set(gi[r][gi[r] >= 0] % a) <= {r % a}
        u = batching.collate([prepared.groups[i] for i in p.example_id], p.example_id, K=2, L=256)
        got = batching.unpack_sequence_sums(np.asarray(p.targets % 97, np.float32), p)
        np.testing.assert_allclose(np.asarray(got), ((u.targets % 97) * u.loss_mask).sum(-1))
