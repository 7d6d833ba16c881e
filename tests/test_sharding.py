"""Mesh construction, logical rules -> PartitionSpecs, train-state snapshot."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mio_jax import models, optim, sharding, testing, train_step

SNAPSHOT = os.path.join(os.path.dirname(__file__), "golden", "state_partition_specs.json")


def test_make_mesh_fills_minus_one_and_names_errors():
    mesh = sharding.make_mesh((2, -1, 1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert sharding.data_parallel_size(mesh) == 8
    small = sharding.make_mesh((1, 1, 1))
    assert small.devices.size == 1
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh((4, 4, 1))
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding.make_mesh((-1, -1, 1))
    with pytest.raises(ValueError, match="equal length"):
        sharding.make_mesh((8,), ("data", "fsdp"))
    with pytest.raises(ValueError, match="cannot fill 8 devices"):
        sharding.make_mesh((3, -1, 1))
    assert sharding.mesh_axis_sizes((2, -1, 2), ("data", "fsdp", "tensor"), 16) == {
        "data": 2, "fsdp": 4, "tensor": 2}


def _tiny_state(mesh, vocab=96):
    cfg = testing.tiny_model_config(vocab_size=vocab)
    abstract = nnx.eval_shape(lambda: models.Decoder(cfg, rngs=nnx.Rngs(0)))
    _, params_state, _ = nnx.split(abstract, nnx.Param, ...)
    param_specs = sharding.state_partition_specs(params_state, None, mesh)
    tx, _ = optim.make_optimizer(learning_rate=1e-3, total_steps=10)
    params = nnx.to_pure_dict(params_state)
    abstract_state = jax.eval_shape(lambda p: train_step.init_state(p, tx), params)
    return train_step.state_specs(tx, params, param_specs), abstract_state


def test_state_partition_specs_match_snapshot():
    mesh = sharding.make_mesh((2, 2, 2))
    specs, _ = _tiny_state(mesh)
    got = sharding.spec_strings(specs)
    if os.environ.get("UPDATE_SNAPSHOTS"):
        with open(SNAPSHOT, "w") as f:
            json.dump(got, f, indent=1, sort_keys=True)
    with open(SNAPSHOT) as f:
        want = json.load(f)
    assert got == want
    # the snapshot is not trivial: weights are sharded over fsdp and tensor
    assert got["params/embed"] == str(P("tensor", "fsdp"))
    assert any("fsdp" in v and "tensor" in v for k, v in got.items() if k.startswith("params/layers"))


def test_optimizer_moments_follow_params_and_scalars_replicate():
    mesh = sharding.make_mesh((2, 2, 2))
    specs, abstract = _tiny_state(mesh)
    flat = sharding.spec_strings(specs)
    for key, spec in flat.items():
        if key.startswith("params/"):
            name = key[len("params/"):]
            mu = [v for k, v in flat.items() if k.endswith("mu/" + name)]
            nu = [v for k, v in flat.items() if k.endswith("nu/" + name)]
            assert mu == [spec] and nu == [spec], key
        if key.endswith("count"):
            assert spec == str(P())
    # every spec tree leaf lines up with the abstract state's leaves
    assert len(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))) == len(
        jax.tree.leaves(abstract))


def test_indivisible_dims_fall_back_to_replication():
    mesh = sharding.make_mesh((1, 2, 4))
    specs, _ = _tiny_state(mesh, vocab=97)  # 97 divides by neither 2 nor 4
    assert sharding.spec_strings(specs)["params/embed"] == str(P(None, "fsdp"))


def test_batch_sharding_splits_the_leading_axis_of_every_field():
    from mio_jax.data import batching, to_global_arrays
    from mio_jax.data.tokenize import TokenizedGroup

    mesh = sharding.make_mesh((2, 2, 2))
    groups = [TokenizedGroup(row_id=str(i), prompt_ids=np.array([5, 6], np.int32),
                             completion_ids=(np.array([7], np.int32), np.array([8], np.int32)))
              for i in range(8)]
    batch = to_global_arrays(batching.collate(groups, np.arange(8), K=2, L=16),
                             sharding.batch_sharding(mesh))
    assert batch.input_ids.sharding.spec == P(("data", "fsdp"))
    assert batch.input_ids.addressable_shards[0].data.shape == (2, 2, 16)
    assert batch.weights.addressable_shards[0].data.shape == (2,)
    assert batch.ref_logps is None
