"""Mesh construction, logical rules -> PartitionSpecs, train-state snapshot."""

import json
import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(__file__))
import trainer_fixtures  # noqa: E402

from mio_jax import models, optim, sharding, train_step  # noqa: E402

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
    with pytest.raises(ValueError, match="differ in length"):
        sharding.make_mesh((8,), ("data", "fsdp"))


def _tiny_state(mesh, vocab=96):
    cfg = trainer_fixtures.tiny_model_config(vocab_size=vocab)
    abstract = nnx.eval_shape(lambda: models.Decoder(cfg, rngs=nnx.Rngs(0)))
    _, params_state, _ = nnx.split(abstract, nnx.Param, ...)
    param_specs = sharding.state_partition_specs(params_state, None, mesh)
    tx, _ = optim.make_optimizer(learning_rate=1e-3, total_steps=10)
    params = nnx.to_pure_dict(params_state)
    abstract_state = jax.eval_shape(lambda p: train_step.init_state(p, tx, 0), params)
    return train_step.TrainState(
        step=P(), params=param_specs,
        opt_state=sharding.optimizer_state_specs(tx, abstract_state.opt_state, param_specs),
        rng=P()), abstract_state


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


def test_batch_shardings_split_leading_axis():
    mesh = sharding.make_mesh((2, 2, 2))
    batch = {"input_ids": np.zeros((8, 2, 16), np.int32), "weights": np.zeros((8,), np.float32)}
    sh = sharding.batch_shardings(mesh, batch)
    assert sh["input_ids"].spec == P(("data", "fsdp"), None, None)
    assert sh["weights"].spec == P(("data", "fsdp"))
    arr = jax.device_put(batch["input_ids"], sh["input_ids"])
    assert arr.addressable_shards[0].data.shape == (2, 2, 16)
