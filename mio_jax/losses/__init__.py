"""Pure preference losses (MIO, DPO, TRL's loss family, SimPO, ORPO, multi-negative MI).

Public API:
  compute(name, *, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
          ref_rejected_logps, beta, chosen_lengths=None, rejected_lengths=None,
          loss_weights=None, **hparams) -> (losses[B], metrics)
  compute_group(name, *, policy_logps[B,K], ref_logps[B,K], beta, lengths=None,
                valid=None, loss_weights=None, **hparams) -> (losses[B], metrics)
  names() -> every registered name;  spec(name) -> LossSpec (frozen metadata)
  one plain function per loss: mio, dpo, sigmoid, ipo, ... (same keywords as compute)

Policy-gradient (GRPO family, TRL's GRPOTrainer semantics; see docs/rl.md):
  policy_loss(loss_type, per_token_logps, old_per_token_logps, advantages, completion_mask,
              *, ref_per_token_logps=None, **hparams) -> (loss, metrics)
  group_advantages(rewards, num_generations, scale_rewards) -> advantages[N]
  rloo_advantages(rewards, num_generations, normalize_advantages=False) -> advantages[N]
  reward_metrics(rewards, num_generations, scale_rewards) -> TRL's reward log

See docs/losses.md for every formula, hparam and metric.
"""

from mio_jax.losses import multi_negative as _multi_negative  # noqa: F401  (registers)
from mio_jax.losses import pairwise as _pairwise  # noqa: F401  (registers)
from mio_jax.losses import reference_free as _reference_free  # noqa: F401  (registers)
from mio_jax.losses._api import compute, compute_group
from mio_jax.losses._public import make_public as _make_public
from mio_jax.losses._registry import LossSpec, names, spec
from mio_jax.losses.divergences import F_DIVERGENCE_TYPES, f_divergence_scores
from mio_jax.losses.policy import (
    POLICY_LOSS_TYPES,
    SCALE_REWARDS,
    group_advantages,
    policy_loss,
    reward_metrics,
    reward_std,
    rloo_advantages,
)

# One plain function per registered loss, e.g. `from mio_jax.losses import mio, dpo`.
aot = _make_public("aot")
aot_unpaired = _make_public("aot_unpaired")
apo_down = _make_public("apo_down")
apo_zero = _make_public("apo_zero")
bco_pair = _make_public("bco_pair")
discopop = _make_public("discopop")
dpo = _make_public("dpo")
exo_pair = _make_public("exo_pair")
hinge = _make_public("hinge")
infonce = _make_public("infonce")
ipo = _make_public("ipo")
js_multi = _make_public("js_multi")
mio = _make_public("mio")
nca_pair = _make_public("nca_pair")
nwj = _make_public("nwj")
orpo = _make_public("orpo")
robust = _make_public("robust")
rpo = _make_public("rpo")
sft = _make_public("sft")
sigmoid = _make_public("sigmoid")
sigmoid_norm = _make_public("sigmoid_norm")
simpo = _make_public("simpo")
sppo_hard = _make_public("sppo_hard")

__all__ = [
    "F_DIVERGENCE_TYPES",
    "LossSpec",
    "POLICY_LOSS_TYPES",
    "SCALE_REWARDS",
    "group_advantages",
    "policy_loss",
    "reward_metrics",
    "reward_std",
    "rloo_advantages",
    "compute",
    "compute_group",
    "f_divergence_scores",
    "names",
    "spec",
    *names(),
]

if set(names()) != {n for n in __all__ if n in globals() and callable(globals()[n])} - {
    "compute",
    "compute_group",
    "f_divergence_scores",
    "names",
    "spec",
    "LossSpec",
    "group_advantages",
    "policy_loss",
    "reward_metrics",
    "reward_std",
    "rloo_advantages",
}:
    raise ImportError("mio_jax.losses: a registered loss has no plain function in __init__")
