"""Pure train and eval steps: ``(state, batch, consts) -> (state, metrics)``.

The batch is one of the typed layouts of ``mio_jax.layouts`` (unshared
``[B, K, L]``, packed ``[R, L]`` rows, shared-prompt ``[B, T]`` rows); one forward
over all completions of the batch gives per-sequence log-probs ``[B, K]``
(``layouts.sequence_logps``, which dispatches on the type), and the loss comes from
the ``mio_jax.losses`` registry, so DPO and MIO differ only by the loss name.

Normalisation is exact under gradient accumulation: every micro-batch returns
the weighted SUM of its per-group losses (and metrics) together with the sum of
its group weights; gradients and metrics are divided by the total weight once,
after the last micro-batch, so ``A`` micro-batches of ``b`` groups give the same
result as one batch of ``A * b`` groups (for every loss whose per-group value
does not depend on other groups of the batch).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import PartitionSpec

from mio_jax import layouts
from mio_jax import logps as logps_lib
from mio_jax import losses as losses_lib
from mio_jax import sharding as sharding_lib
from mio_jax.models import moe as moe_lib


@struct.dataclass
class TrainState:
    """The whole mutable state of training (an immutable pytree).

    Attributes:
      step: int32 scalar, optimizer steps taken.
      params: pure dict of trainable parameter arrays (master dtype).
      opt_state: the optax state.
    """

    step: jax.Array
    params: Any
    opt_state: Any


@struct.dataclass
class StepConsts:
    """What the step reads but never updates.

    Attributes:
      other: everything the optimizer does not update (pure dict; ``stages.Model.other``):
        non-parameter state and, under LoRA, the whole frozen base (possibly quantized).
      ref_params: the frozen reference's weights (``reference.mode="frozen"``), else None.
    """

    other: Any
    ref_params: Any = None


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the step (hashable; part of the jit cache key).

    Attributes:
      loss_name: a registered loss, or a tuple of names for a weighted mix.
      beta: the loss temperature.
      loss_hparams: sorted ``(name, value)`` hyper-parameters of the loss.
      loss_weights: mix weights (None: all 1).
      grad_accum_steps: micro-batches per optimizer step (A).
      chunk_size: vocabulary chunk of the log-prob projection.
      reference: where the reference log-probs come from: "frozen" (a copy of the initial
        weights in ``StepConsts.ref_params``), "base" (a LoRA model's own base: its
        weights with the adapters off, no copy), "precomputed" (the batch's
        ``ref_logps``) or "none" (reference-free losses).
      lengths: pass completion lengths to the loss (needed by length-normalised losses).
      ld_alpha: LD-DPO weight of tokens past the shorter completion (None: off).
      use_weighting: WPO weighting of each group's loss (TRL ``use_weighting``).
      max_tokens_fraction: if set, the output projection runs only on completion
        positions, gathered into a static block of ``ceil(fraction * size)`` rows of a
        (micro-)batch's ``loss_mask`` (``layouts.completion_block``); a batch with more
        completion tokens than that gives NaN log-probs (caught by the NaN guard), never
        silently dropped tokens. None: project every position.
      weight_norms: also report ``param_norm`` (after the update) and ``update_norm``;
        each is one more pass over all weights per step (about 3 % of a SmolLM2 CPU
        step each, ~0.5 % on an accelerator), so they are opt-in.
      dropout_seed: LoRA dropout's seed (its key is folded with the step and the
        micro-batch); None when the model has no dropout.
      max_grad_norm: the optimizer's global-norm clip (None: no clip); the step reports
        ``grad_clipped`` (1 when the gradient norm exceeded it), so a window's mean is the
        fraction of its steps that were clipped.
      router_aux_loss_coef, router_z_loss_coef: a mixture of experts' router losses
        (Switch load balancing, ST-MoE z-loss) added to the loss with these weights; 0:
        off. Their values and the experts' load are logged either way (``router/...``).
      policy_loss: a policy-gradient loss type (``losses.POLICY_LOSS_TYPES``) for rollout
        batches (``advantages`` set, unshared layout): the step then optimises
        ``losses.policy_loss`` on per-token log-probs instead of a preference loss, with
        ``policy_hparams`` (sorted ``(name, value)``: beta, epsilon, ...). None: preference.
    """

    loss_name: str | tuple[str, ...]
    beta: float
    loss_hparams: tuple[tuple[str, Any], ...] = ()
    loss_weights: tuple[float, ...] | None = None
    grad_accum_steps: int = 1
    chunk_size: int = logps_lib.DEFAULT_CHUNK_SIZE
    reference: str = "frozen"
    lengths: bool = True
    ld_alpha: float | None = None
    use_weighting: bool = False
    max_tokens_fraction: float | None = None
    weight_norms: bool = False
    dropout_seed: int | None = None
    max_grad_norm: float | None = None
    policy_loss: str | None = None
    policy_hparams: tuple[tuple[str, Any], ...] = ()
    router_aux_loss_coef: float = 0.0
    router_z_loss_coef: float = 0.0

    def full_projection(self) -> "StepConfig":
        """The same settings with the output projection on every position."""
        return dataclasses.replace(self, max_tokens_fraction=None)


def projection_fits(cfg: StepConfig, mask_shape, row_counts) -> bool:
    """Host-side check before a step: does every micro-batch's completion-token count fit
    the static projection block? (A step whose batch does not fit would give NaN.)

    Args:
      cfg: the step's settings (``max_tokens_fraction``, ``grad_accum_steps``).
      mask_shape: shape of the GLOBAL batch's ``loss_mask`` (rows first).
      row_counts: completion tokens of each global row, in row order (numpy ``[rows]``).
    """
    a = cfg.grad_accum_steps
    block = layouts.completion_block(cfg.max_tokens_fraction, (mask_shape[0] // a, *mask_shape[1:]))
    if block is None:
        return True
    counts = np.asarray(row_counts).reshape(-1, a).sum(axis=0)  # row j*A + i -> micro i
    return int(counts.max()) <= block


# Which weights a forward pass runs: "policy", the model as it trains (a LoRA model with its
# adapters on), or "base", the model without its adapters: a LoRA model's frozen base, which
# is the reference under LoRA (a model without adapters is its own base).
VIEWS = ("policy", "base")


def policy_logps(graphdef, params, other, batch: layouts.Batch,
                 cfg: StepConfig, *, view: str = "policy",
                 dropout_key=None) -> layouts.SequenceLogps:
    """Per-sequence log-probs, lengths and (WPO) weights of one batch under ``params``,
    seen as ``view`` (one of ``VIEWS``); ``dropout_key`` turns on LoRA dropout (training
    only)."""
    if view not in VIEWS:
        raise ValueError(f"view={view!r}: expected one of {VIEWS}")
    model = nnx.merge(graphdef, params, other)
    if hasattr(model, "set_adapters"):
        model.set_adapters(view == "policy", dropout_key)
    return layouts.sequence_logps(model, batch, chunk_size=cfg.chunk_size,
                                  completion_fraction=cfg.max_tokens_fraction,
                                  ld_alpha=cfg.ld_alpha, use_weighting=cfg.use_weighting)


def token_logps(graphdef, params, other, batch: layouts.Batch, cfg: StepConfig, *,
                view: str = "policy") -> jax.Array:
    """Per-token log-probs ``[B, K, L]`` (``layouts.token_table``) of a rollout batch under
    ``params`` seen as ``view`` (no gradient): an online round's old-policy and reference
    tables."""
    if view not in VIEWS:
        raise ValueError(f"view={view!r}: expected one of {VIEWS}")
    model = nnx.merge(graphdef, jax.lax.stop_gradient(params), other)
    if hasattr(model, "set_adapters"):
        model.set_adapters(view == "policy", None)
    return jax.lax.stop_gradient(
        layouts.token_logps(model, batch, chunk_size=cfg.chunk_size).logps_bt)


def reference_logps(graphdef, ref_params, other, batch: layouts.Batch,
                    cfg: StepConfig, *, view: str = "base") -> jax.Array:
    """Reference per-sequence log-prob sums ``[B, K]`` (no gradient). The reference is a
    base (a frozen copy of the initial weights, or a LoRA model's base) unless ``view`` is
    "policy" (an online round's reference: the policy as the round started)."""
    seq = policy_logps(graphdef, jax.lax.stop_gradient(ref_params), other, batch,
                       dataclasses.replace(cfg, use_weighting=False), view=view).logps
    return jax.lax.stop_gradient(seq)


def _counts(batch: layouts.Batch, w_b) -> dict:
    return {"num_tokens": jnp.sum(batch.attention_mask != 0).astype(jnp.float32),
            "completion_tokens": jnp.sum(batch.loss_mask != 0).astype(jnp.float32),
            "num_groups": jnp.sum(w_b > 0).astype(jnp.float32)}


def _real_slots(batch: layouts.Batch):
    """[B, K] bool: the completions of real groups (padding groups and empty slots out)."""
    return (batch.weights > 0)[:, None] & batch.valid.astype(bool)


def _rollout_mask(batch: layouts.Batch):
    """[B, K, L] float32 (``layouts.token_table``): the completion tokens that count (a
    truncated completion masked under ``mask_truncated_completions`` has none)."""
    mask = layouts.token_table((batch.loss_mask != 0).astype(jnp.float32), batch)
    return mask * _real_slots(batch)[..., None].astype(jnp.float32)


def rollout_totals(batch: layouts.Batch) -> dict:
    """What a policy-gradient step normalises by, over the WHOLE step's batch (all its
    micro-batches): the real completions (masked ones included, as TRL counts its rows),
    the tokens that count, and the group weight."""
    return {"sequences": jnp.sum(_real_slots(batch).astype(jnp.float32)),
            "tokens": jnp.sum(_rollout_mask(batch)),
            "weight": jnp.sum(batch.weights.astype(jnp.float32))}


def _policy_sums(params, graphdef, consts: StepConsts, batch: layouts.Batch,
                 cfg: StepConfig, dropout_key, totals: dict):
    """A rollout micro-batch's share of the step's policy-gradient loss (times the step's
    group weight, which ``train_step`` divides by), and its metric sums."""
    model = nnx.merge(graphdef, params, consts.other)
    if hasattr(model, "set_adapters"):
        model.set_adapters(True, dropout_key)
    stats, router = layouts.token_logps(model, batch, chunk_size=cfg.chunk_size,
                                        with_entropy=True, with_router=True)
    tok = stats.logps_bt
    b, k, l = tok.shape

    def flat(x):
        return None if x is None else x.reshape(b * k, l)

    loss, metrics = losses_lib.policy_loss(
        cfg.policy_loss, flat(tok), flat(batch.old_token_logps), batch.advantages.reshape(b * k),
        flat(_rollout_mask(batch)), ref_per_token_logps=flat(batch.ref_token_logps),
        num_items_in_batch=totals["tokens"], num_sequences=totals["sequences"],
        entropies=flat(stats.entropy_bt), **dict(cfg.policy_hparams))
    w_b = batch.weights.astype(jnp.float32)
    micro_weight = jnp.sum(w_b)
    loss_sum = loss * totals["weight"]
    sums = {key: jnp.nan_to_num(v.astype(jnp.float32)) * micro_weight for key, v in metrics.items()}
    if router is not None:  # (a micro-batch's router terms weigh as its share of the step)
        loss_sum, router_sums = _router_terms(router, cfg, micro_weight, loss_sum)
        sums.update(router_sums)
    sums["loss"] = jax.lax.stop_gradient(loss_sum)
    return loss_sum, (sums, _counts(batch, w_b), micro_weight)


def _weighted_sums(params, graphdef, consts: StepConsts, batch: layouts.Batch,
                   cfg: StepConfig, dropout_key=None, totals=None):
    """Weighted loss sum of one micro-batch, plus metric sums and the weight sum.
    ``totals``: ``rollout_totals`` of the whole step (policy-gradient steps only)."""
    if cfg.policy_loss is not None:
        return _policy_sums(params, graphdef, consts, batch, cfg, dropout_key,
                            rollout_totals(batch) if totals is None else totals)
    if cfg.reference in ("frozen", "base"):
        # "base": a LoRA model's own weights with the adapters off, no second copy of any
        ref_bk = reference_logps(graphdef, consts.ref_params if cfg.reference == "frozen"
                                 else params, consts.other, batch, cfg)
        # The reference forward runs to completion before the policy forward starts, so
        # its temporaries are freed before the policy's saved activations pile up (left to
        # the scheduler, the two can overlap and add up at the memory peak).
        ref_bk, params = jax.lax.optimization_barrier((ref_bk, params))
    elif cfg.reference == "precomputed":
        ref_bk = batch.ref_logps
    else:
        ref_bk = None
    policy = policy_logps(graphdef, params, consts.other, batch, cfg, dropout_key=dropout_key)
    w_b = batch.weights.astype(jnp.float32)
    # A padding group (weight 0) has no valid completion; a multi-negative loss over
    # zero negatives is 0/0. Mark its (finite, empty) slots valid so its loss stays
    # finite; its zero weight then removes it from sums and gradients alike.
    valid = batch.valid.astype(bool) | (w_b <= 0)[:, None]
    losses_b, metrics = losses_lib.compute_group(
        cfg.loss_name, policy_logps=policy.logps, ref_logps=ref_bk, beta=cfg.beta,
        lengths=policy.lengths if cfg.lengths else None, valid=valid,
        loss_weights=cfg.loss_weights, **dict(cfg.loss_hparams))
    if policy.wpo_weights is not None:
        losses_b = losses_b * jax.lax.stop_gradient(policy.wpo_weights)
        metrics = dict(metrics, **{"wpo/weights": policy.wpo_weights})
    loss_sum = jnp.sum(w_b * losses_b)
    sums = {k: jnp.sum(w_b * v.astype(jnp.float32)) for k, v in metrics.items()
            if v.ndim == 1}
    if policy.router is not None:
        loss_sum, router_sums = _router_terms(policy.router, cfg, jnp.sum(w_b), loss_sum)
        sums.update(router_sums)
    sums["loss"] = jax.lax.stop_gradient(loss_sum)
    return loss_sum, (sums, _counts(batch, w_b), jnp.sum(w_b))


def _router_terms(stats, cfg: StepConfig, weight, loss_sum):
    """A mixture of experts' router losses, added to ``loss_sum`` with their coefficients
    (per unit of group weight, like the loss), and its router metrics as weighted sums.

    Metrics: ``router/load_balancing_loss`` and ``router/z_loss`` (whether or not they
    are optimised); ``router/expert_load_max`` / ``_min``: the busiest and idlest expert's
    share of the assignments times the number of experts (1 = perfectly balanced);
    ``router/assignments_per_token``: the (token, expert) rows the grouped matmuls ran,
    per token: exactly ``num_experts_per_tok`` when no token is dropped."""
    balance, z = moe_lib.load_balancing_loss(stats), moe_lib.z_loss(stats)
    if cfg.router_aux_loss_coef or cfg.router_z_loss_coef:
        loss_sum = loss_sum + weight * (cfg.router_aux_loss_coef * balance
                                        + cfg.router_z_loss_coef * z)
    assigned = jnp.sum(stats.expert_tokens)
    load = stats.expert_tokens * stats.expert_tokens.shape[-1] / jnp.maximum(assigned, 1.0)
    values = {"router/load_balancing_loss": balance, "router/z_loss": z,
              "router/expert_load_max": jnp.max(load), "router/expert_load_min": jnp.min(load),
              "router/assignments_per_token": stats.computed / jnp.maximum(stats.tokens, 1.0)}
    return loss_sum, {k: jax.lax.stop_gradient(v) * weight for k, v in values.items()}


def _micro_batches(batch: layouts.Batch, a: int) -> layouts.Batch:
    """``[A*b, ...] -> [A, b, ...]`` keeping each device's rows on that device.

    Row ``j * A + i`` goes to micro-batch ``i``; the batch axis stays the one
    split over devices, so no data moves. Packed rows were packed per micro-batch
    (``batching.pack(micro_batches=A)``): their tokens' group ``b`` becomes ``b // A``,
    its index among the micro-batch's groups.
    """
    def split(x):
        g = x.shape[0]
        if g % a:
            raise ValueError(f"batch of {g} groups is not divisible by grad_accum_steps={a}")
        return jnp.swapaxes(x.reshape(g // a, a, *x.shape[1:]), 0, 1)

    micro = jax.tree.map(split, batch)
    if isinstance(batch, layouts.PackedBatch):
        micro = micro.replace(group_index=jnp.where(micro.group_index >= 0,
                                                    micro.group_index // a, -1))
    return micro


def _dropout_key(cfg: StepConfig, step, micro):
    if cfg.dropout_seed is None:
        return None
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(cfg.dropout_seed), step),
                              micro)


def _accumulate(params, graphdef, consts: StepConsts, batch: layouts.Batch, cfg: StepConfig,
                step=0):
    """Gradient and metric SUMS over ``cfg.grad_accum_steps`` micro-batches."""
    grad_fn = jax.value_and_grad(_weighted_sums, has_aux=True)
    totals = rollout_totals(batch) if cfg.policy_loss is not None else None
    if cfg.grad_accum_steps == 1:
        (_, aux), grads = grad_fn(params, graphdef, consts, batch, cfg,
                                  _dropout_key(cfg, step, 0), totals)
        return grads, aux
    micro = _micro_batches(batch, cfg.grad_accum_steps)

    def body(carry, xs):
        grads_acc, aux_acc = carry
        i, mb = xs
        (_, aux), grads = grad_fn(params, graphdef, consts, mb, cfg, _dropout_key(cfg, step, i),
                                  totals)
        return (jax.tree.map(jnp.add, grads_acc, grads), jax.tree.map(jnp.add, aux_acc, aux)), None

    first = jax.tree.map(lambda x: x[0], micro)
    aux_shape = jax.eval_shape(lambda: grad_fn(params, graphdef, consts, first, cfg, None,
                                               totals)[0][1])
    zeros_aux = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
    zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.result_type(p.dtype, jnp.float32)),
                           params)
    index = jnp.arange(cfg.grad_accum_steps)
    (grads, aux), _ = jax.lax.scan(body, (zeros_g, zeros_aux), (index, micro))
    return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params), aux


def _finish_metrics(sums, counts, denom):
    safe = jnp.maximum(denom, jnp.finfo(jnp.float32).tiny)
    out = {k: v / safe for k, v in sums.items()}
    out.update(counts)
    return out


def train_step(state: TrainState, batch: layouts.Batch, consts: StepConsts, *, graphdef, tx,
               schedule, cfg: StepConfig) -> tuple[TrainState, dict]:
    """One optimizer step (pure; jit it with the keyword arguments bound via partial).

    Args:
      state: the ``TrainState``.
      batch: a typed batch (``mio_jax.layouts``); ``ref_logps`` set for a precomputed
        reference.
      consts: ``StepConsts`` (the state that does not train, frozen reference weights).
      graphdef: the model's nnx GraphDef.
      tx: the optax transformation; schedule: its learning-rate schedule.
      cfg: ``StepConfig``.

    Returns:
      ``(new_state, metrics)``: scalar metrics (weighted means over the groups
      of the step, token counts as sums), including ``loss``, ``grad_norm`` and
      ``learning_rate`` (``param_norm``, ``update_norm`` with ``cfg.weight_norms``;
      ``grad_clipped`` with ``cfg.max_grad_norm``).
    """
    grads, (sums, counts, denom) = _accumulate(state.params, graphdef, consts, batch, cfg,
                                               state.step)
    safe = jnp.maximum(denom, jnp.finfo(jnp.float32).tiny)
    grads = jax.tree.map(lambda g: (g / safe).astype(g.dtype), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = _finish_metrics(sums, counts, denom)
    grad_norm = optax.tree.norm(grads)
    metrics.update({
        "grad_norm": grad_norm,
        "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
    })
    if cfg.max_grad_norm is not None:
        metrics["grad_clipped"] = (grad_norm > cfg.max_grad_norm).astype(jnp.float32)
    if cfg.weight_norms:
        metrics.update({"update_norm": optax.tree.norm(updates),
                        "param_norm": optax.tree.norm(params)})
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: layouts.Batch, consts: StepConsts, *, graphdef,
              cfg: StepConfig) -> tuple[dict, dict, jax.Array]:
    """Metric sums of one eval batch (no update); divide by the summed weights on the host.

    Returns:
      ``(sums, counts, weight_sum)``: weighted metric sums (``loss`` included),
      token counts, and the batch's total group weight.
    """
    _, aux = _weighted_sums(params, graphdef, consts, batch, cfg)
    return aux


def init_state(params, tx) -> TrainState:
    """A fresh ``TrainState`` at step 0 (jit with out_shardings to build it sharded)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def state_specs(tx, params_abstract, param_specs) -> TrainState:
    """PartitionSpecs of the ``TrainState`` for params of these specs (optimizer moments
    follow the params, scalars replicated)."""
    abstract = jax.eval_shape(lambda p: init_state(p, tx), params_abstract)
    return TrainState(
        step=PartitionSpec(), params=param_specs,
        opt_state=sharding_lib.optimizer_state_specs(tx, abstract.opt_state, param_specs))
