"""The train step compiles for a real TPU topology here (libtpu's compiler, no TPU needed),
so a TPU-only compile error is caught on this machine."""

import json
import subprocess
import sys

import pytest

from mio_jax import aot

# Runs in a process of its own: TPU_LIBRARY_PATH must be set before JAX starts.
PROGRAM = r"""
import json
import jax, jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from mio_jax import aot, layouts, models, optim, sharding, testing, train_step

import sys
devices = aot.topology_devices("v5p:2x2x1")
family = sys.argv[1]  # llama | gemma (Gemma 3: sliding + global layers, soft-caps) | moe
if family == "moe":  # experts over an expert axis, their width over tensor
    mesh = sharding.make_mesh((1, 1, 2, 2), sharding.KNOWN_AXES, devices=devices)
else:
    mesh = sharding.make_mesh((1, 2, 2), devices=devices)
make = {"llama": testing.tiny_model_config, "gemma": testing.tiny_gemma_config,
        "moe": testing.tiny_moe_config}[family]
cfg = make(dtype="bfloat16", param_dtype="float32")
abstract = nnx.eval_shape(lambda: models.Decoder(cfg, rngs=nnx.Rngs(0)))
graphdef, p_state, o_state = nnx.split(abstract, nnx.Param, ...)
specs = sharding.state_partition_specs(p_state, None, mesh)
params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                        sharding=NamedSharding(mesh, s)),
                      nnx.to_pure_dict(p_state), specs)
tx, schedule = optim.make_optimizer(learning_rate=1e-3, total_steps=10)
state_sh = sharding.named(mesh, train_step.state_specs(tx, params, specs))
state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                     jax.eval_shape(lambda p: train_step.init_state(p, tx), params), state_sh)
data = sharding.batch_sharding(mesh)
f = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=data)
batch = layouts.PreferenceBatch(**{k: f((4, 2, 32), jnp.int32) for k in layouts.TOKEN_FIELDS},
                                weights=f((4,), jnp.float32), valid=f((4, 2), jnp.bool_),
                                example_id=f((4,), jnp.int32))
consts = train_step.StepConsts({}, params)
step_cfg = train_step.StepConfig(loss_name="mio", beta=0.1, chunk_size=64)
step = jax.jit(lambda s, b, c: train_step.train_step(s, b, c, graphdef=graphdef, tx=tx,
                                                     schedule=schedule, cfg=step_cfg),
               in_shardings=(state_sh, data, jax.tree.map(lambda x: x.sharding, consts)),
               out_shardings=(state_sh, None), donate_argnums=0)
with jax.set_mesh(mesh):
    compiled = step.lower(state, batch, consts).compile()
print("RESULT " + json.dumps({
    "kind": devices[0].device_kind, "devices": len(devices),
    "peak": aot.peak_bytes(compiled),
    "param_bytes": sum(x.size * 4 for x in jax.tree.leaves(params))}))
"""


@pytest.mark.parametrize("family", ["llama", "gemma", "moe"])
def test_tiny_train_step_compiles_for_a_tpu_v5p_topology(family):
    try:
        env = aot.tpu_env()
    except FileNotFoundError as e:
        pytest.skip(f"libtpu cannot be used here: {e}")
    out = subprocess.run([sys.executable, "-c", PROGRAM, family], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(next(line[7:] for line in out.stdout.splitlines()
                             if line.startswith("RESULT ")))
    assert result["kind"] == "TPU v5" and result["devices"] == 4
    # the state lives on the chips: the per-device peak holds at least each device's share
    # of weights + Adam moments (sharded over 4), and stays far below the 95 GB of a chip
    assert 3 * result["param_bytes"] / 4 <= result["peak"] < 1e9
