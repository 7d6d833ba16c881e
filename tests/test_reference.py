"""Precomputed reference log-probs: digests, cache hits, invalidation, stale detection,
and precomputed == frozen through the whole trainer."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

import tolerance
from mio_jax import layouts, reference, testing
from mio_jax.models import frozen


def _host_batches(n_groups=10, bs=4, L=12, seed=0, bump=None):
    """Unpacked host batches like the eval pipeline's (last one padded with id -1)."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, n_groups, bs):
        ids = np.arange(start, start + bs)
        ids[ids >= n_groups] = -1
        b = {k: np.zeros((bs, 2, L), np.int32) for k in
             ("input_ids", "targets", "loss_mask", "attention_mask", "positions")}
        for i, e in enumerate(ids):
            if e < 0:
                continue
            r = np.random.default_rng([seed, int(e)])
            for k in range(2):
                n = int(r.integers(4, L))
                toks = r.integers(3, 50, n)
                if bump is not None and e == bump and k == 0:
                    toks[-1] += 1
                b["input_ids"][i, k, :n] = toks
                b["targets"][i, k, :n - 1] = toks[1:]
                b["loss_mask"][i, k, 2:n - 1] = 1
                b["attention_mask"][i, k, :n] = 1
        b["weights"] = (ids >= 0).astype(np.float32)
        b["valid"] = np.repeat((ids >= 0)[:, None], 2, 1)
        b["example_id"] = ids.astype(np.int32)
        out.append(layouts.PreferenceBatch(**b))
    del rng
    return out


def _ref_fn(calls):
    def fn(b):
        calls.append(1)
        # any deterministic function of the tokens stands in for a model here
        return (b.input_ids * b.loss_mask).sum(-1).astype(np.float32) / 100.0
    return fn


def test_digest_ignores_padding_but_not_tokens():
    b = _host_batches(4, 4, L=12)[0]
    wide = {k: np.pad(getattr(b, k), [(0, 0), (0, 0), (0, 5)]) for k in layouts.TOKEN_FIELDS}
    d1 = reference.group_digests(b.input_ids, b.targets, b.loss_mask, b.attention_mask)
    d2 = reference.group_digests(wide["input_ids"], wide["targets"], wide["loss_mask"],
                                 wide["attention_mask"])
    assert (d1 == d2).all() and len(set(d1.tolist())) == 4
    b.loss_mask[0, 1, 2] = 0  # the same tokens with another completion boundary
    d3 = reference.group_digests(b.input_ids, b.targets, b.loss_mask, b.attention_mask)
    assert d3[0] != d1[0] and (d3[1:] == d1[1:]).all()


def test_cache_hit_and_invalidation(tmp_path):
    d = str(tmp_path)
    calls = []
    kw = dict(cache_dir=d, ref_fn=_ref_fn(calls), settings={"dtype": "float32"})
    t1, p1, hit1 = reference.build_or_load(batches=lambda: _host_batches(), weights_fp="w0", **kw)
    assert not hit1 and len(calls) == 3 and os.path.exists(p1) and os.path.exists(p1 + ".json")
    want = np.concatenate([_ref_fn([])(b) for b in _host_batches()])[:10]
    np.testing.assert_allclose(t1.lookup(np.arange(10)), want)
    # same data and reference: the forward pass is skipped
    t2, p2, hit2 = reference.build_or_load(batches=lambda: _host_batches(), weights_fp="w0", **kw)
    assert hit2 and p2 == p1 and len(calls) == 3
    np.testing.assert_array_equal(t2.lookup(np.arange(10)), t1.lookup(np.arange(10)))
    # another reference, or one changed token in the data, or other settings: recomputed
    _, p3, hit3 = reference.build_or_load(batches=lambda: _host_batches(), weights_fp="w1", **kw)
    assert not hit3 and p3 != p1 and len(calls) == 6
    _, p4, hit4 = reference.build_or_load(batches=lambda: _host_batches(bump=7),
                                          weights_fp="w0", **kw)
    assert not hit4 and p4 not in (p1, p3)
    _, p5, hit5 = reference.build_or_load(batches=lambda: _host_batches(), weights_fp="w0",
                                          cache_dir=d, ref_fn=_ref_fn(calls),
                                          settings={"dtype": "bfloat16"})
    assert not hit5 and p5 not in (p1, p3, p4)


def test_corrupt_cache_is_recomputed_not_used(tmp_path):
    calls = []
    kw = dict(cache_dir=str(tmp_path), ref_fn=_ref_fn(calls), settings={}, weights_fp="w")
    t1, path, _ = reference.build_or_load(batches=lambda: _host_batches(), **kw)
    with open(path, "r+b") as f:
        f.truncate(50)
    t2, _, hit = reference.build_or_load(batches=lambda: _host_batches(), **kw)
    assert not hit and len(calls) == 6
    np.testing.assert_array_equal(t1.lookup(np.arange(10)), t2.lookup(np.arange(10)))


def test_table_lookup_pads_and_detects_unknown_examples(tmp_path):
    t, _, _ = reference.build_or_load(cache_dir=str(tmp_path), batches=lambda: _host_batches(),
                                      ref_fn=_ref_fn([]), weights_fp="w", settings={})
    out = t.lookup(np.array([3, -1, 0]), np.array([1.0, 0.0, 1.0]))
    assert out.shape == (3, 2) and (out[1] == 0).all() and (out[0] != 0).any()
    with pytest.raises(reference.StaleCacheError, match=r"example_id\(s\) \[12\]"):
        t.lookup(np.array([12]), np.array([1.0]))


def test_weights_fingerprint_sees_any_change():
    p = {"a": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones((5,))}
    fp = reference.weights_fingerprint(p)
    assert reference.weights_fingerprint({"a": p["a"], "b": p["b"]}) == fp
    assert reference.weights_fingerprint({"a": p["a"].at[2, 1].add(1e-3), "b": p["b"]}) != fp
    assert reference.weights_fingerprint({"a": p["a"], "b": p["b"].astype(jnp.bfloat16)}) != fp


@pytest.mark.rounding
def test_precomputed_and_frozen_modes_give_the_same_run(tmp_path, tiny_config):
    from mio_jax import train

    m, t, e = testing.tiny_setup(str(tmp_path))
    base = dict(**{"train.steps": 3, "eval.every_steps": 0, "checkpoint.every_steps": 100,
                   "checkpoint.export_hf": False})
    frozen = train.train_and_evaluate(tiny_config(m, t, e, **base),
                                      str(tmp_path / "frozen"))
    cache = str(tmp_path / "cache")
    pre_cfg = tiny_config(m, t, e, **base, **{"reference.mode": "precomputed",
                                                               "reference.cache_dir": cache})
    pre = train.train_and_evaluate(pre_cfg, str(tmp_path / "pre"))
    # The two modes compute the reference log-probs in different programs (float32
    # rounding apart); tolerances from the numbers compared (tests/tolerance.py).
    tolerance.assert_results_close(pre, frozen, beta=0.1, learning_rate=1e-3, steps=3,
                                   keys=("loss", "rewards/chosen", "rewards/margins",
                                         "logps/chosen", "grad_norm"), params=False)

    def files():
        return {f: os.path.getmtime(os.path.join(cache, f)) for f in os.listdir(cache)
                if f.endswith(".npz")}

    first = files()
    assert len(first) == 2  # train and eval splits
    # a second run reuses both files untouched
    again = train.train_and_evaluate(pre_cfg, str(tmp_path / "pre2"))
    assert files() == first and again["train"]["loss"] == pytest.approx(pre["train"]["loss"])
    # a changed training file gets a new train cache (the eval one is reused)
    with open(t, "a") as f:
        f.write('{"prompt": "q: 1+1=", "chosen": " 2.", "rejected": " 3."}\n')
    train.train_and_evaluate(pre_cfg, str(tmp_path / "pre3"))
    now = files()
    assert len(now) == 3 and all(now[f] == first[f] for f in first)


@pytest.mark.parametrize("untied", [False, True])
def test_frozen_params_in_compute_dtype_give_identical_logps(untied):
    """Float32 master weights, bfloat16 compute: the frozen reference kept in bfloat16
    (half the memory) yields bit-identical reference log-probs, keeps each weight's
    sharding, and float32 compute keeps the weights as they are."""
    import functools

    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from mio_jax import models, train_step
    from mio_jax.data import batching
    from mio_jax.data.tokenize import TokenizedGroup

    cfg = testing.tiny_model_config(dtype="bfloat16", param_dtype="float32",
                                             tie_word_embeddings=not untied)
    graphdef, p, o = nnx.split(models.init_model(cfg, seed=1), nnx.Param, ...)
    params, other = nnx.to_pure_dict(p), nnx.to_pure_dict(o)
    cast = frozen.frozen_params(params, "bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(cast))
    sh = NamedSharding(jax.make_mesh((8,), ("fsdp",)), P("fsdp"))
    moved = frozen.frozen_params({"w": jax.device_put(jnp.ones((16, 4)), sh)}, "bfloat16")
    assert moved["w"].sharding == sh and moved["w"].dtype == jnp.bfloat16
    rng = np.random.default_rng(0)
    groups = [TokenizedGroup(row_id=f"r{i}", prompt_ids=rng.integers(5, 90, 4).astype(np.int32),
                             completion_ids=(rng.integers(5, 90, 5).astype(np.int32),
                                             rng.integers(5, 90, 3).astype(np.int32)))
              for i in range(4)]
    batch = batching.collate(groups, np.arange(4), K=2, L=12)
    step_cfg = train_step.StepConfig(loss_name="mio", beta=0.1, chunk_size=40, lengths=False)
    fn = jax.jit(functools.partial(train_step.reference_logps, graphdef, cfg=step_cfg))
    want = np.asarray(fn(params, other, batch))
    assert np.all(np.isfinite(want))
    np.testing.assert_array_equal(np.asarray(fn(cast, other, batch)), want)
    assert frozen.frozen_params(params, "float32") is params
