"""Pairwise losses with a reference model: MIO and TRL's DPO `loss_type` family.

Notation (per pair b): z_w, z_l log-ratios (policy minus reference log-prob sums);
s_w, s_l their f-divergence scores (= z under the default reverse_kl); D = s_w - s_l;
L_w, L_l completion token counts (clamped at 1); eps = label_smoothing. Every core
returns per-example losses [B] whose batch mean is TRL's batch loss (for `aot`,
`aot_unpaired` the rows are in sorted order, for `sft` see `chosen_nll_b`).
Formulas follow TRL 1.16's `DPOTrainer._compute_loss` term for term.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mio_jax.losses._common import (
    Group,
    cdpo,
    chosen_nll_b,
    clipped_exp,
    concrete_float,
    log_sigmoid,
    softplus,
)
from mio_jax.losses._registry import register
from mio_jax.losses.divergences import F_DIVERGENCE_HPARAMS, pair_scores

_F = F_DIVERGENCE_HPARAMS
_SQUARE_CLIP = 1e18
Out = tuple[jax.Array, dict[str, jax.Array]]


@register(
    "mio",
    trl_name="nca_pair",
    summary="sp(-b z_w) + 1/2 sp(b z_w) + 1/2 sp(b z_l)  (= -I_JS; = TRL nca_pair)",
)
def _mio(g: Group) -> Out:
    """MIO (Lv et al. 2025): minus the Jensen-Shannon MI bound; term for term TRL's nca_pair."""
    tw, tl = g.beta * g.z_w, g.beta * g.z_l
    return softplus(-tw) + 0.5 * softplus(tw) + 0.5 * softplus(tl), {}


@register(
    "nca_pair",
    trl_name="nca_pair",
    summary="-log s(b z_w) - 1/2 log s(-b z_w) - 1/2 log s(-b z_l)  (pairwise NCA, = mio)",
)
def _nca_pair(g: Group) -> Out:
    """Pairwise NCA (Chen et al. 2024), written as TRL writes it; identical to `mio`."""
    tw, tl = g.beta * g.z_w, g.beta * g.z_l
    return -log_sigmoid(tw) - 0.5 * log_sigmoid(-tw) - 0.5 * log_sigmoid(-tl), {}


@register("sigmoid", trl_name="sigmoid", hparams=_F, summary="-log s(b D)")
def _sigmoid(g: Group, **hp: Any) -> Out:
    """DPO (Rafailov et al. 2023), TRL's `sigmoid`: log 2 - I_DV."""
    sw, sl = pair_scores(g, hp)
    return -log_sigmoid(g.beta * (sw - sl)), {}


@register(
    "dpo",
    trl_name="sigmoid",
    hparams={"label_smoothing": 0.0, **_F},
    summary="-(1-eps) log s(b D) - eps log s(-b D)  (cDPO; eps = 0 is TRL sigmoid)",
)
def _dpo(g: Group, *, label_smoothing: Any, **hp: Any) -> Out:
    """DPO with conservative label smoothing (cDPO, Mitchell 2023); eps = 0 is `sigmoid`."""
    sw, sl = pair_scores(g, hp)
    return cdpo(g.beta * (sw - sl), label_smoothing), {}


@register(
    "rpo",
    needs_lengths="chosen",
    hparams={"rpo_alpha": 1.0},
    summary="-log s(b (z_w - z_l)) + alpha * NLL_w  (Pang et al. 2024; = sigmoid + alpha sft)",
)
def _rpo(g: Group, *, rpo_alpha: Any) -> Out:
    """RPO: DPO plus alpha times the chosen NLL (TRL's former `rpo_alpha`)."""
    nll = chosen_nll_b(g)
    return -log_sigmoid(g.beta * (g.z_w - g.z_l)) + rpo_alpha * nll, {"nll_loss": nll}


@register("hinge", trl_name="hinge", hparams=_F, summary="relu(1 - b D)  (SLiC)")
def _hinge(g: Group, **hp: Any) -> Out:
    """Hinge loss (SLiC, Zhao et al. 2023)."""
    sw, sl = pair_scores(g, hp)
    return jax.nn.relu(1.0 - g.beta * (sw - sl)), {}


@register(
    "ipo",
    trl_name="ipo",
    needs_lengths="both",
    hparams=_F,
    summary="(s_w/L_w - s_l/L_l - 1/(2b))^2  (IPO, token-averaged as TRL)",
)
def _ipo(g: Group, **hp: Any) -> Out:
    """IPO (Azar et al. 2023) on length-averaged scores, as TRL (confirmed by the IPO authors)."""
    sw, sl = pair_scores(g, hp)
    diff = sw / g.len_w - sl / g.len_l - 1.0 / (2.0 * g.beta)
    # Exponential f-divergence scores can reach e^80; squared that overflows float32
    # (TRL returns inf there). The clip only acts where the loss would exceed 1e36.
    return jnp.clip(diff, -_SQUARE_CLIP, _SQUARE_CLIP) ** 2, {}


@register(
    "exo_pair",
    trl_name="exo_pair",
    hparams={"label_smoothing": 1e-3, **_F},
    summary="s(bD)[log s(bD) - log(1-eps)] + s(-bD)[log s(-bD) - log eps]  (EXO, eps > 0)",
)
def _exo_pair(g: Group, *, label_smoothing: Any, **hp: Any) -> Out:
    """EXO-pref (Ji et al. 2024, eq. 16): KL(softmax critic || [1-eps, eps])."""
    eps = concrete_float(label_smoothing)
    if eps is not None and not 0.0 < eps < 1.0:
        raise ValueError(f"loss 'exo_pair' needs 0 < label_smoothing < 1 (paper: 1e-3), got {eps}")
    sw, sl = pair_scores(g, hp)
    x = g.beta * (sw - sl)
    eps_a = jnp.asarray(label_smoothing, x.dtype)
    qw, ql = jax.nn.sigmoid(x), jax.nn.sigmoid(-x)
    return qw * (log_sigmoid(x) - jnp.log1p(-eps_a)) + ql * (log_sigmoid(-x) - jnp.log(eps_a)), {}


@register(
    "robust",
    trl_name="robust",
    hparams={"label_smoothing": 0.0, **_F},
    summary="[-(1-eps) log s(bD) + eps log s(-bD)] / (1 - 2 eps)  (rDPO)",
)
def _robust(g: Group, *, label_smoothing: Any, **hp: Any) -> Out:
    """Robust DPO (Chowdhury et al. 2024): unbiased under label-flip rate eps in [0, 0.5)."""
    eps = concrete_float(label_smoothing)
    if eps is not None and not 0.0 <= eps < 0.5:
        raise ValueError(f"loss 'robust' needs 0 <= label_smoothing < 0.5, got {eps}")
    sw, sl = pair_scores(g, hp)
    x = g.beta * (sw - sl)
    clean = -(1.0 - label_smoothing) * log_sigmoid(x)
    flipped = -label_smoothing * log_sigmoid(-x)
    return (clean - flipped) / (1.0 - 2.0 * label_smoothing), {}


@register(
    "bco_pair",
    trl_name="bco_pair",
    hparams={"delta": 0.0},
    summary="-log s(b z_w - delta) - log s(-(b z_l - delta))  (delta = 0 in TRL 1.16)",
)
def _bco_pair(g: Group, *, delta: Any) -> Out:
    """Pairwise BCO (Jung et al. 2024). `delta` is the reward shift (BCO's running mean of
    the rewards, which older TRL kept as state); TRL 1.16 uses no shift, i.e. delta = 0.
    The caller owns any running estimate and passes it in."""
    tw, tl = g.beta * g.z_w, g.beta * g.z_l
    return -log_sigmoid(tw - delta) - log_sigmoid(-(tl - delta)), {}


@register(
    "sppo_hard",
    trl_name="sppo_hard",
    summary="(z_w - 1/(2b))^2 + (z_l + 1/(2b))^2  (SPPO, hard labels)",
)
def _sppo_hard(g: Group) -> Out:
    """SPPO with hard win probabilities (Wu et al. 2024, eq. 4.7 with P in {0, 1})."""
    half = 0.5 / g.beta
    return (g.z_w - half) ** 2 + (g.z_l + half) ** 2, {}


@register(
    "aot",
    trl_name="aot",
    hparams={"label_smoothing": 0.0},
    couples_batch=True,  # sorts over the batch axis
    summary="d = sort_B(pi_w - pi_l) - sort_B(ref_w - ref_l); cDPO(b d)  (AOT paired)",
)
def _aot(g: Group, *, label_smoothing: Any) -> Out:
    """Distributional alignment via optimal transport (Melnyk et al. 2024), paired form.
    Sorts across the batch axis, so row b of the output is the b-th order statistic."""
    d = jnp.sort(g.pol_w - g.pol_l) - jnp.sort(g.ref_w - g.ref_l)
    return cdpo(g.beta * d, label_smoothing), {}


@register(
    "aot_unpaired",
    trl_name="aot_unpaired",
    hparams={"label_smoothing": 0.0},
    couples_batch=True,  # sorts over the batch axis
    summary="d = sort_B(z_w) - sort_B(z_l); cDPO(b d)  (AOT unpaired)",
)
def _aot_unpaired(g: Group, *, label_smoothing: Any) -> Out:
    """AOT, unpaired form: sorted chosen log-ratios against sorted rejected ones."""
    d = jnp.sort(g.z_w) - jnp.sort(g.z_l)
    return cdpo(g.beta * d, label_smoothing), {}


@register(
    "apo_zero",
    trl_name="apo_zero",
    summary="(1 - s(b z_w)) + s(b z_l)  (APO-zero)",
)
def _apo_zero(g: Group) -> Out:
    """Anchored preference optimisation, zero anchor (D'Oosterlinck et al. 2024, eq. 7)."""
    return (1.0 - jax.nn.sigmoid(g.beta * g.z_w)) + jax.nn.sigmoid(g.beta * g.z_l), {}


@register(
    "apo_down",
    trl_name="apo_down",
    summary="s(b z_w) + (1 - s(b (z_w - z_l)))  (APO-down)",
)
def _apo_down(g: Group) -> Out:
    """APO, down anchor (eq. 8): for chosen outputs worse than the model's own."""
    return jax.nn.sigmoid(g.beta * g.z_w) + (1.0 - jax.nn.sigmoid(g.beta * (g.z_w - g.z_l))), {}


@register(
    "discopop",
    trl_name="discopop",
    hparams={"discopop_tau": 0.05, **_F},
    summary="x = b D, m = s(x/tau): (1-m)(-log s(x)) + m e^{-x}  (DiscoPOP)",
)
def _discopop(g: Group, *, discopop_tau: Any, **hp: Any) -> Out:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, eq. 5)."""
    tau = concrete_float(discopop_tau)
    if tau is not None and not tau > 0.0:
        raise ValueError(f"loss 'discopop' needs discopop_tau > 0, got {tau}")
    sw, sl = pair_scores(g, hp)
    x = g.beta * (sw - sl)
    m = jax.nn.sigmoid(x / discopop_tau)
    return -log_sigmoid(x) * (1.0 - m) + clipped_exp(-x) * m, {}


@register(
    "sigmoid_norm",
    trl_name="sigmoid_norm",
    needs_lengths="both",
    hparams=_F,
    summary="-log s(b (s_w/L_w - s_l/L_l))  (length-normalised DPO)",
)
def _sigmoid_norm(g: Group, **hp: Any) -> Out:
    """DPO on per-token-averaged scores (TRL's `sigmoid_norm`)."""
    sw, sl = pair_scores(g, hp)
    return -log_sigmoid(g.beta * (sw / g.len_w - sl / g.len_l)), {}


@register(
    "sft",
    trl_name="sft",
    needs_reference=False,
    needs_lengths="chosen",
    hparams=_F,
    summary="-n logp_w[b] / sum_b L_w[b], n = rows with L_w >= 1  (mean = token-mean chosen NLL)",
)
def _sft(g: Group, **hp: Any) -> Out:
    """TRL's `sft` term: the mean NLL over all chosen completion tokens of the batch.
    Returned per example as -n * logp_w[b] / sum L_w (n rows with L_w >= 1) so that its
    batch mean is exact.
    (f_divergence_type is accepted, as TRL does, and has no effect.)"""
    del hp
    return chosen_nll_b(g), {}

