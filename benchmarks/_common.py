"""Shared pieces of the benchmarks: models by name, synthetic pair batches, the trainer's
jitted step, the measured matmul peak, peak memory, and table printing. Not part of the
package: the scripts import it as ``_common`` (``python benchmarks/X.py`` puts this folder
on ``sys.path``) or as ``benchmarks._common`` (``python -m benchmarks.X`` from the repo
root); mio_jax itself comes from the environment (``pip install -e .``)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import resource
import statistics
import sys
import time

import numpy as np

# Config-shaped random models (Hugging Face config.json fields). llama1b is Llama-3.2-1B's shape.
SHAPES = {
    "llama1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048,
                    intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
                    tie_word_embeddings=True),
    "smollm2_shape": dict(model_type="llama", vocab_size=49152, hidden_size=576,
                          intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                          rope_theta=100000.0, tie_word_embeddings=True),
    # Gemma-3-1B's shape: 26 layers, 5 sliding (window 512, RoPE base 1e4) per global one.
    "gemma3_1b": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152,
                      intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=256, rms_norm_eps=1e-6,
                      rope_theta=1000000.0, rope_local_theta=10000.0, sliding_window=512,
                      layer_types=tuple("full_attention" if (i + 1) % 6 == 0
                                        else "sliding_attention" for i in range(26)),
                      hidden_act="gelu_pytorch_tanh", norm_weight_offset=True,
                      sandwich_norms=True, scale_embeddings=True, qk_norm=True,
                      query_pre_attn_scalar=256.0, tie_word_embeddings=True),
    # Qwen3-30B-A3B's layer (2048 wide, experts of 768, 8 a token) with 4 layers and 64
    # experts: ~1.9 B parameters, a one-GPU stand-in for the mixture's step.
    "qwen3_moe_4l": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
                         intermediate_size=6144, num_hidden_layers=4, num_attention_heads=32,
                         num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6,
                         rope_theta=1000000.0, qk_norm=True, num_experts=64,
                         num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                         tie_word_embeddings=False),
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True),
}


def build_model(name: str, *, dtype: str = "float32", param_dtype: str = "float32",
                remat_policy: str = "none", scan_layers: bool = True, attention: str = "xla"):
    """Returns ``(graphdef, params, other, model_cfg)`` for "smollm2", a folder / .gguf,
    or a shape in ``SHAPES`` (random weights)."""
    from flax import nnx

    from mio_jax import models

    if name in SHAPES:
        cfg = models.ModelConfig(**SHAPES[name], dtype=dtype, param_dtype=param_dtype,
                                 remat_policy=remat_policy, scan_layers=scan_layers,
                                 attention=attention)
        model = models.init_model(cfg, seed=0)
    else:
        model = models.load_pretrained(models.resolve_model_path(name), dtype=dtype,
                                       param_dtype=param_dtype, remat_policy=remat_policy,
                                       scan_layers=scan_layers, attention=attention)
    graphdef, p, o = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(p), nnx.to_pure_dict(o), model.cfg


def graphdef_for(model_cfg, **changes):
    """The graphdef of the same model with other ModelConfig fields (e.g. remat_policy)."""
    from flax import nnx

    from mio_jax import models

    cfg = dataclasses.replace(model_cfg, **changes)
    abstract = nnx.eval_shape(lambda: models.Decoder(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(abstract, nnx.Param, ...)[0]


def add_model_args(p, *, model: str, pairs: int, seq_len: int, dtype: str = "float32",
                   param_dtype: bool = True) -> None:
    """The flags every step benchmark takes: --model, --pairs, --seq_len, --dtype (and
    --param_dtype)."""
    p.add_argument("--model", default=model, help="smollm2 | a folder/.gguf | "
                   + " | ".join(SHAPES))
    p.add_argument("--pairs", type=int, default=pairs)
    p.add_argument("--seq_len", type=int, default=seq_len)
    p.add_argument("--dtype", default=dtype, help="compute dtype")
    if param_dtype:
        p.add_argument("--param_dtype", default="float32", help="master weights / Adam dtype")


def synthetic_groups(pairs: int, seq_len: int, prompt_frac: float, vocab: int, seed: int = 0):
    """``pairs`` tokenised pairs of random tokens (ids >= 5, clear of the special tokens):
    prompt ``round(frac * L)`` tokens; chosen fills L, rejected is ``L // 8`` shorter."""
    from mio_jax.data.tokenize import TokenizedGroup

    rng = np.random.default_rng(seed)
    p = max(1, int(round(prompt_frac * seq_len)))
    c0 = seq_len - p
    c1 = max(1, c0 - seq_len // 8)
    return [TokenizedGroup(row_id=f"s{i}", prompt_ids=rng.integers(5, vocab, p).astype(np.int32),
                           completion_ids=(rng.integers(5, vocab, c0).astype(np.int32),
                                           rng.integers(5, vocab, c1).astype(np.int32)))
            for i in range(pairs)]


def synthetic_pairs(pairs: int, seq_len: int, prompt_frac: float, vocab: int, seed: int = 0):
    """The unshared ``[B, 2, L]`` ``PreferenceBatch`` (numpy) of ``synthetic_groups``."""
    from mio_jax import data

    groups = synthetic_groups(pairs, seq_len, prompt_frac, vocab, seed)
    return data.collate(groups, np.arange(pairs), K=2, L=seq_len)


def synthetic_rollouts(prompts: int, g: int, seq_len: int, prompt_frac: float, vocab: int,
                       seed: int = 0):
    """GRPO rollout batches of ``prompts`` groups of ``g`` answers: (unshared ``[B, G, L]``,
    shared-prompt ``[B, T]``), each with an old-policy table and advantages. A prompt has
    ``prompt_frac * seq_len`` tokens; answer lengths are drawn over 1/4 .. 1 of the rest."""
    from mio_jax import rollouts

    rng = np.random.default_rng(seed)
    p = max(int(seq_len * prompt_frac), 1)
    c = seq_len - p
    samples = [{"prompt_ids": rng.integers(5, vocab, p).tolist(),
                "samples": [{"ids": rng.integers(5, vocab, int(rng.integers(max(c // 4, 1), c + 1))
                                                 ).tolist(),
                             "reward": float(rng.integers(0, 2)), "finish": "eos"}
                            for _ in range(g)]} for _ in range(prompts)]
    built = [rollouts.build(samples, scale_rewards="group", mask_truncated_completions=False,
                            drop_zero_std_groups=False, min_length=16, shared_prompt=shared)[0]
             for shared in (False, True)]
    # one table for both: a token sits at its unshared position in either layout
    old = -rng.uniform(0.5, 3, (prompts, g, max(ro.length for ro in built))).astype(np.float32)
    return tuple(rollouts.local_batch(ro, np.arange(prompts), pad_id=0, process_index=0,
                                      process_count=1, old_logps=old[..., :ro.length])
                 for ro in built)


def completion_fraction(batch, margin: float = 1.05) -> float:
    """``StepConfig.max_tokens_fraction`` sized to this batch's layout: its completion
    tokens over its ``loss_mask`` slots, times ``margin`` (capped at 1). Each layout
    (unshared ``[B, 2, L]``, shared-prompt ``[B, T]``) needs its own."""
    mask = np.asarray(batch.loss_mask)
    return min(1.0, margin * float(np.mean(mask != 0)) + 1e-3)


def init_state(params, tx):
    """The trainer's fresh ``TrainState`` for ``params``, built by jit (as ``mio_jax.train``)."""
    import jax

    from mio_jax import train_step

    return jax.jit(functools.partial(train_step.init_state, tx=tx))(params)


def jit_train_step(graphdef, tx, cfg, schedule, **jit_kwargs):
    """The trainer's step ``(state, batch, consts) -> (state, metrics)``, jitted with the
    state donated as ``mio_jax.train`` does.

    Args:
      graphdef, tx, cfg: as ``mio_jax.train_step.train_step``.
      schedule: the optax learning-rate schedule, or a float for a constant rate.
      **jit_kwargs: more ``jax.jit`` arguments (in_shardings, out_shardings).
    """
    import jax
    import optax

    from mio_jax import train_step

    if not callable(schedule):
        schedule = optax.constant_schedule(schedule)
    return jax.jit(functools.partial(train_step.train_step, graphdef=graphdef, tx=tx,
                                     schedule=schedule, cfg=cfg),
                   donate_argnums=0, **jit_kwargs)


def matmul_peak_flops(n: int = 2048, dtype: str = "float32", reps: int = 7) -> float:
    """Measured FLOP/s of one jitted ``n x n`` matmul on the default device (median of
    ``reps``). On an accelerator each timing covers 10 products issued back to back, so
    the host's dispatch and the wait for the result are not counted as device time."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.dtype(dtype))
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    inner = 1 if jax.devices()[0].platform == "cpu" else 10
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        outs = [f(a, b) for _ in range(inner)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - t0) / inner)
    return 2.0 * n ** 3 / statistics.median(times)


def peak_flops(dtype: str) -> tuple[float, str]:
    """(peak FLOP/s per device, how it was obtained): the vendor dense peak on known
    accelerators, else the measured jax matmul peak of this device in ``dtype``."""
    import jax

    from mio_jax import metrics

    dev = jax.devices()[0]
    if dev.platform != "cpu":
        known = metrics.peak_flops_per_device(dev.device_kind)
        if known:
            return known, f"vendor dense bf16 peak of {dev.device_kind}"
    how = f"measured jax {dtype} 2048^3 matmul on {dev.device_kind}"
    return matmul_peak_flops(dtype=dtype), how


def host_peak_rss_bytes(children: bool = False) -> int:
    """Peak resident set size of this process (or its waited-for children), bytes."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss * 1024  # Linux reports KiB


def device_peak_bytes() -> int | None:
    """Peak bytes in use on device 0 (accelerators), None where not reported (CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def machine() -> str:
    import platform

    import jax

    dev = jax.devices()[0]
    flags = os.environ.get("XLA_FLAGS", "")
    return (f"{platform.machine()} {os.cpu_count()} cpus, jax {jax.__version__}, "
            f"{dev.platform}:{dev.device_kind} x{jax.device_count()}"
            + (f", XLA_FLAGS={flags}" if flags else ""))


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def print_table(rows: list[dict], cols: list[str], file=sys.stdout) -> None:
    """Markdown table of ``rows`` (dicts) with the given columns."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    print("| " + " | ".join(cols) + " |", file=file)
    print("|" + "|".join("---" for _ in cols) + "|", file=file)
    for r in rows:
        print("| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |", file=file)
    file.flush()


def dump_json(path: str | None, obj) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, default=str)
