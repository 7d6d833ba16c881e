"""Orbax checkpoints: sharded round trip, keep-K, corrupt/partial latest falls back (nothing
moved), a changed state stops naming what differs, transient read errors are retried."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mio_jax import checkpoint, sharding


def _state(mesh, scale):
    w = jax.device_put(jnp.arange(64.0).reshape(8, 8) * scale, NamedSharding(mesh, P("fsdp", "tensor")))
    return {"w": w, "step": jnp.asarray(int(scale), jnp.int32)}


def _abstract(mesh):
    return {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32,
                                      sharding=NamedSharding(mesh, P("fsdp", "tensor"))),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))}


def test_round_trip_keeps_values_shardings_data_state_and_config(tmp_path):
    mesh = sharding.make_mesh((2, 2, 2))
    ck = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=3)
    data_state = {"next_index": 7, "blob": b"\x00\x01grain"}
    ck.save(5, _state(mesh, 5.0), data_state=data_state, config={"loss": {"beta": 0.1}})
    ck.wait()
    step, state, data, cfg = ck.restore(_abstract(mesh))
    assert step == 5 and data == data_state and cfg == {"loss": {"beta": 0.1}}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(64.0).reshape(8, 8) * 5)
    assert state["w"].sharding.spec == P("fsdp", "tensor")
    ck.close()


def test_keeps_last_k(tmp_path):
    mesh = sharding.make_mesh((2, 2, 2))
    ck = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=2)
    for s in range(1, 6):
        ck.save(s, _state(mesh, float(s)))
    ck.wait()
    assert ck.steps() == [4, 5]
    assert ck.save(5, _state(mesh, 5.0)) is False  # an existing step is not overwritten
    ck.close()


def _truncate_array_data(folder):
    """Cuts every array data file (OCDBT ``d/`` chunks) to a third, like a torn write."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs
             if os.path.basename(r) == "d"]
    assert files
    for path in files:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)


def _files(folder) -> dict[str, int]:
    return {os.path.relpath(os.path.join(r, f), folder): os.path.getsize(os.path.join(r, f))
            for r, _, fs in os.walk(folder) for f in fs}


def test_corrupt_latest_falls_back_to_previous_and_nothing_is_moved(tmp_path, caplog):
    mesh = sharding.make_mesh((2, 2, 2))
    d = str(tmp_path / "ckpt")
    ck = checkpoint.Checkpointer(d, keep=3, retry_wait=0.0)
    ck.save(2, _state(mesh, 2.0), data_state={"i": 2})
    ck.save(4, _state(mesh, 4.0), data_state={"i": 4})
    ck.close()
    _truncate_array_data(os.path.join(d, "4", "state"))
    before = _files(str(tmp_path))
    ck = checkpoint.Checkpointer(d, keep=3, retry_wait=0.0)
    step, state, data, _ = ck.restore(_abstract(mesh))
    assert step == 2 and data == {"i": 2}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(64.0).reshape(8, 8) * 2)
    # the broken step stays where it was, byte for byte; it is not saved over
    assert _files(str(tmp_path)) == before and ck.steps() == [2, 4] and ck.unreadable == [4]
    assert "unreadable on process(es) [0]" in caplog.text
    caplog.clear()
    assert ck.save(4, _state(mesh, 4.0)) is False
    assert "move " in caplog.text and os.path.join(d, "4") in caplog.text
    ck.close()


def test_a_changed_state_stops_with_what_differs_and_moves_nothing(tmp_path):
    mesh = sharding.make_mesh((2, 2, 2))
    d = str(tmp_path / "ckpt")
    ck = checkpoint.Checkpointer(d)
    ck.save(3, _state(mesh, 3.0))
    ck.close()
    before = _files(d)
    wider = dict(_abstract(mesh), w=jax.ShapeDtypeStruct(
        (8, 16), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", "tensor"))))
    ck = checkpoint.Checkpointer(d)
    with pytest.raises(checkpoint.CheckpointMismatch,
                       match=r"step 3 .*\(w: saved \(8, 8\) float32, run \(8, 16\) float32"):
        ck.restore(wider)
    extra = dict(_abstract(mesh), mu=_abstract(mesh)["w"])
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"\(mu: only in the run"):
        ck.restore(extra)
    as_bf16 = dict(_abstract(mesh), w=jax.ShapeDtypeStruct(
        (8, 8), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp", "tensor"))))
    with pytest.raises(checkpoint.CheckpointMismatch, match="float32, run \\(8, 8\\) bfloat16"):
        ck.restore(as_bf16)
    assert _files(d) == before and ck.steps() == [3]
    assert isinstance(checkpoint.CheckpointMismatch("x"), ValueError)  # exit status 2 in main
    ck.close()


def test_a_transient_read_error_is_retried(tmp_path, monkeypatch):
    mesh = sharding.make_mesh((2, 2, 2))
    d = str(tmp_path / "ckpt")
    ck = checkpoint.Checkpointer(d, retry_wait=0.0)
    ck.save(5, _state(mesh, 5.0), data_state={"i": 5})
    ck.wait()
    real, calls = ocp.StandardCheckpointHandler.restore, []

    def flaky(self, *args, **kwargs):  # the storage fails twice, then answers
        calls.append(1)
        if len(calls) <= 2:
            raise OSError("connection reset by peer")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "restore", flaky)
    step, state, data, _ = ck.restore(_abstract(mesh))
    assert step == 5 and data == {"i": 5} and len(calls) == 3 and ck.unreadable == []
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(64.0).reshape(8, 8) * 5)
    ck.close()


def test_partial_latest_is_ignored_and_empty_dir_gives_none(tmp_path):
    mesh = sharding.make_mesh((2, 2, 2))
    d = str(tmp_path / "ckpt")
    ck = checkpoint.Checkpointer(d)
    assert ck.restore(_abstract(mesh)) is None
    ck.save(3, _state(mesh, 3.0))
    ck.close()
    # a save that never committed leaves only a temporary folder
    os.makedirs(os.path.join(d, "6.orbax-checkpoint-tmp", "state"))
    ck = checkpoint.Checkpointer(d)
    step, _, _, _ = ck.restore(_abstract(mesh))
    assert step == 3
    ck.close()
