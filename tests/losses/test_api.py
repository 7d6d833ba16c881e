"""Registry, dispatch, weighted mixes and error messages of mio_jax.losses."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import mio_jax.losses as L

B = 3
PW, PL = jnp.asarray([-10.0, -22.0, -5.0]), jnp.asarray([-12.0, -20.0, -9.0])
RW, RL = jnp.asarray([-11.0, -21.0, -6.0]), jnp.asarray([-11.5, -21.0, -8.0])
LW, LL = jnp.asarray([4, 9, 2]), jnp.asarray([5, 8, 3])
PAIR = dict(policy_chosen_logps=PW, policy_rejected_logps=PL, ref_chosen_logps=RW, ref_rejected_logps=RL)
LENS = dict(chosen_lengths=LW, rejected_lengths=LL)

TRL_LOSS_TYPES = {
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
}  # fmt: skip


def test_names_and_specs():
    names = set(L.names())
    assert TRL_LOSS_TYPES | {"mio", "dpo", "rpo", "simpo", "orpo", "infonce", "js_multi", "nwj"} == names
    for name in names:
        s = L.spec(name)
        assert s.name == name and callable(getattr(L, name))
        assert getattr(L, name).__name__ == name and "Args:" in getattr(L, name).__doc__
        with pytest.raises(dataclasses.FrozenInstanceError):
            s.needs_reference = not s.needs_reference  # type: ignore[misc]
        with pytest.raises(TypeError):
            s.hparams["new"] = 1  # type: ignore[index]
    assert not L.spec("simpo").needs_reference and L.spec("simpo").needs_lengths == "both"
    assert not L.spec("sft").needs_reference and L.spec("sft").needs_lengths == "chosen"
    assert L.spec("mio").needs_reference and L.spec("mio").trl_name == "nca_pair"
    assert dict(L.spec("discopop").hparams)["discopop_tau"] == 0.05
    assert dict(L.spec("bco_pair").hparams) == {"delta": 0.0}
    assert L.spec("infonce").kind == "multi_negative" and L.spec("dpo").kind == "pairwise"


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown loss 'dpoo'.*valid losses: .*mio.*sigmoid"):
        L.compute("dpoo", **PAIR, beta=0.1)
    with pytest.raises(ValueError, match="unknown loss"):
        L.spec("kto")


def test_unknown_hparam_names_hparam_and_loss():
    with pytest.raises(ValueError, match=r"unknown hparam 'label_smoothing' for loss sigmoid"):
        L.compute("sigmoid", **PAIR, beta=0.1, label_smoothing=0.1)  # TRL 1.16's sigmoid has none
    with pytest.raises(ValueError, match=r"unknown hparam 'f_divergence_type' for loss mio"):
        L.mio(**PAIR, beta=0.1, f_divergence_type="forward_kl")  # as TRL: no f-divergence for nca_pair
    with pytest.raises(ValueError, match="unknown f_divergence_type 'kl'"):
        L.dpo(**PAIR, beta=0.1, f_divergence_type="kl")


def test_missing_reference_and_lengths_errors():
    with pytest.raises(ValueError, match=r"loss 'mio' needs reference log-probs"):
        L.mio(policy_chosen_logps=PW, policy_rejected_logps=PL, beta=0.1)
    with pytest.raises(ValueError, match=r"loss 'ipo' needs completion lengths"):
        L.ipo(**PAIR, beta=0.1)
    with pytest.raises(ValueError, match="pass both ref_chosen_logps and ref_rejected_logps"):
        L.dpo(policy_chosen_logps=PW, policy_rejected_logps=PL, ref_chosen_logps=RW, beta=0.1)
    with pytest.raises(ValueError, match=r"`chosen_lengths` has entries < 1 .* indices \[\[1\]\]"):
        L.simpo(policy_chosen_logps=PW, policy_rejected_logps=PL, beta=2.0, chosen_lengths=jnp.asarray([3, 0, 2]), rejected_lengths=LL)


def test_bad_shapes_and_values_name_the_tensor():
    with pytest.raises(ValueError, match=r"`policy_rejected_logps` has shape \(2,\), expected \(3,\)"):
        L.dpo(**{**PAIR, "policy_rejected_logps": PL[:2]}, beta=0.1)
    with pytest.raises(ValueError, match=r"`ref_chosen_logps` must have rank 1"):
        L.dpo(**{**PAIR, "ref_chosen_logps": RW[:, None]}, beta=0.1)
    with pytest.raises(ValueError, match="beta must be > 0"):
        L.dpo(**PAIR, beta=0.0)
    with pytest.raises(ValueError, match="'exo_pair' needs 0 < label_smoothing"):
        L.exo_pair(**PAIR, beta=0.1, label_smoothing=0.0)
    with pytest.raises(ValueError, match="'robust' needs 0 <= label_smoothing < 0.5"):
        L.robust(**PAIR, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="'discopop' needs discopop_tau > 0"):
        L.discopop(**PAIR, beta=0.1, discopop_tau=0.0)
    with pytest.raises(ValueError, match="`policy_chosen_logps` must be an array, got list"):
        L.mio(**{**PAIR, "policy_chosen_logps": [1.0, 2.0, 3.0]}, beta=0.1)


def test_reference_free_losses_ignore_reference():
    a, ma = L.simpo(**PAIR, beta=2.0, **LENS)
    b, mb = L.simpo(policy_chosen_logps=PW, policy_rejected_logps=PL, ref_chosen_logps=None, ref_rejected_logps=None, beta=2.0, **LENS)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(ma["rewards/chosen"], 2.0 * PW / LW, rtol=1e-6)
    o, mo = L.orpo(policy_chosen_logps=PW, policy_rejected_logps=PL, beta=0.1, **LENS)
    assert np.all(np.isfinite(o)) and {"log_odds_ratio", "log_odds_chosen", "nll_loss"} <= set(mo)


def test_weighted_mix_reports_each_loss():
    mix, m = L.compute(("sigmoid", "bco_pair", "sft"), **PAIR, beta=0.1, **LENS, loss_weights=(0.8, 0.2, 1.0))
    parts = {n: L.compute(n, **PAIR, beta=0.1, **LENS)[0] for n in ("sigmoid", "bco_pair", "sft")}
    np.testing.assert_allclose(mix, 0.8 * parts["sigmoid"] + 0.2 * parts["bco_pair"] + parts["sft"], rtol=1e-6)
    for n, v in parts.items():
        np.testing.assert_allclose(m[f"loss/{n}"], v, rtol=1e-6)
    # Shared hparams go to every member that declares them, defaults elsewhere.
    mix2, _ = L.compute(("robust", "aot"), **PAIR, beta=0.1, label_smoothing=0.2)
    want = L.robust(**PAIR, beta=0.1, label_smoothing=0.2)[0] + L.aot(**PAIR, beta=0.1, label_smoothing=0.2)[0]
    np.testing.assert_allclose(mix2, want, rtol=1e-6)
    with pytest.raises(ValueError, match="loss_weights has 1 entries for 2 losses"):
        L.compute(("sigmoid", "sft"), **PAIR, beta=0.1, **LENS, loss_weights=(1.0,))
    with pytest.raises(ValueError, match="loss names repeat"):
        L.compute(("sigmoid", "sigmoid"), **PAIR, beta=0.1)


def test_compute_group_dispatch_and_errors():
    pol, ref, lens = jnp.stack([PW, PL], 1), jnp.stack([RW, RL], 1), jnp.stack([LW, LL], 1)
    for name in ("mio", "ipo", "simpo", "infonce"):
        g, mg = L.compute_group(name, policy_logps=pol, ref_logps=ref, beta=0.2, lengths=lens)
        c, mc = L.compute(name, **PAIR, beta=0.2, **LENS)
        np.testing.assert_allclose(g, c, rtol=1e-6)
        np.testing.assert_allclose(mg["mi/dv"], mc["mi/dv"], rtol=1e-6)
    pol4 = jnp.concatenate([pol, pol - 1.0], axis=1)
    with pytest.raises(ValueError, match=r"pairwise loss\(es\) \['dpo'\] need K = 2"):
        L.compute_group("dpo", policy_logps=pol4, ref_logps=pol4, beta=0.1)
    with pytest.raises(ValueError, match=r"`valid\[:, 0\]` \(the positive\) is False in rows \[1\]"):
        L.compute_group("infonce", policy_logps=pol4, ref_logps=pol4, beta=0.1, valid=jnp.ones((3, 4), bool).at[1, 0].set(False))
    with pytest.raises(ValueError, match="need every slot of `valid` True"):
        L.compute_group("mio", policy_logps=pol, ref_logps=ref, beta=0.1, valid=jnp.ones((3, 2), bool).at[0, 1].set(False))
    with pytest.raises(ValueError, match=r"`ref_logps` has shape \(3, 2\), expected \(3, 4\)"):
        L.compute_group("infonce", policy_logps=pol4, ref_logps=ref, beta=0.1)
    with pytest.raises(ValueError, match="need K >= 2"):
        L.compute_group("infonce", policy_logps=pol[:, :1], ref_logps=ref[:, :1], beta=0.1)


def test_multi_negative_metrics_at_k4():
    pol = jnp.asarray([[-10.0, -12.0, -9.0, -30.0]])
    ref = jnp.asarray([[-11.0, -11.0, -11.0, -11.0]])
    valid = jnp.asarray([[True, True, False, True]])
    _, m = L.compute_group("js_multi", policy_logps=pol, ref_logps=ref, beta=0.5, valid=valid)
    # T = 0.5 * [1, -1, (2 absent), -19]
    assert float(m["rewards/chosen"][0]) == pytest.approx(0.5)
    assert float(m["rewards/rejected"][0]) == pytest.approx((-0.5 - 9.5) / 2)
    assert float(m["rewards/accuracies"][0]) == 1.0  # beats both valid negatives (the absent one would win)
    assert float(m["logps/rejected"][0]) == pytest.approx(-21.0)
