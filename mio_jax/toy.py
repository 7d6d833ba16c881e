"""The toy of method.md section 8: why DPO's chosen likelihood collapses and MIO's does not.

A "policy" is a softmax over `num_candidates` responses whose logits are
`features_nd @ theta_d` with shared `feature_dim`-dimensional features. The
reference is the initial policy. Each preference pair's rejected response has
features close to its chosen one (`rejected = chosen + similarity_noise * noise`),
as real chosen and rejected completions share most of their tokens. The
policy is trained with the real `mio_jax.losses` functions and optax, all
steps inside one `lax.scan`, so a run of thousands of steps takes a second.

Why the effect appears: DPO's loss depends only on the margin
`z_w - z_l = (phi_w - phi_l) . (theta - theta_0)`, so every DPO step moves
theta along the small difference direction `phi_w - phi_l`. Moving along it
sends the softmax mass to whichever of the 50 candidates projects furthest on
that direction, rarely the chosen one; both log-ratios fall, the rejected
one faster. MIO's chosen term pushes `beta * z_w` back towards ln 2, whatever
the margin.

    python -m mio_jax.toy --out=docs/results/toy
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags

from mio_jax import cli, losses


def get_config() -> ml_collections.ConfigDict:
    """Default toy settings (every one recorded in the metrics JSON)."""
    c = ml_collections.ConfigDict()
    c.num_candidates = 50
    c.feature_dim = 8
    c.num_pairs = 1  # preference pairs trained on together (disjoint candidates)
    c.similarity_noise = 0.3  # rejected features = chosen features + this * N(0, I)
    c.init_scale = 1.0  # theta_0 ~ init_scale * N(0, I / feature_dim): a non-uniform reference
    c.steps = 3000
    c.optimizer = "sgd"  # "sgd" or "adam"
    c.learning_rate = 1.0  # plain SGD: the step is the loss's gradient weight, nothing rescales it
    c.seed = 0
    c.num_seeds = 20  # seeds 0..num_seeds-1 for the end-value summary
    c.record_every = 10  # curves in the result keep steps 0, 10, 20, ... and the last
    # (label, registered loss name, beta). beta_MIO = 2 * beta_DPO matches the initial gradients
    # (method.md section 4: DPO's (-beta/2, +beta/2) at z = 0 against MIO's (-beta/4, +beta/4)).
    c.runs = (("dpo_beta0.1", "dpo", 0.1), ("mio_beta0.2", "mio", 0.2), ("mio_beta0.1", "mio", 0.1))
    return c


FLAGS = flags.FlagValues()
flags.DEFINE_string("out", None, "output folder for metrics.json and toy.png", flag_values=FLAGS,
                    required=True)
# every setting of get_config() but the runs, whose tuples a flag does not spell
cli.define_from_defaults({k: v for k, v in get_config().items() if k != "runs"}, FLAGS,
                         "a toy setting (see get_config())")


def make_problem(key: jax.Array, cfg: ml_collections.ConfigDict) -> dict[str, jax.Array]:
    """Draws the candidate features, the pairs and the reference parameters.

    Args:
      key: PRNG key.
      cfg: toy config (`num_candidates`, `feature_dim`, `num_pairs`, `similarity_noise`, `init_scale`).

    Returns:
      dict with `features_nd` [N, D], `chosen_p` / `rejected_p` [P] candidate indices and
      `theta0_d` [D] (reference = initial policy).
    """
    n, d, p = cfg.num_candidates, cfg.feature_dim, cfg.num_pairs
    if 2 * p > n:
        raise ValueError(f"num_pairs={p} needs 2 * num_pairs <= num_candidates={n}")
    k_feat, k_noise, k_theta = jax.random.split(key, 3)
    features_nd = jax.random.normal(k_feat, (n, d))
    chosen_p = jnp.arange(p)
    rejected_p = jnp.arange(p, 2 * p)
    near_pd = features_nd[chosen_p] + cfg.similarity_noise * jax.random.normal(k_noise, (p, d))
    features_nd = features_nd.at[rejected_p].set(near_pd)
    theta0_d = cfg.init_scale * jax.random.normal(k_theta, (d,)) / math.sqrt(d)
    return dict(features_nd=features_nd, chosen_p=chosen_p, rejected_p=rejected_p, theta0_d=theta0_d)


def _optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    if cfg.optimizer == "sgd":
        return optax.sgd(cfg.learning_rate)
    if cfg.optimizer == "adam":
        return optax.adam(cfg.learning_rate)
    raise ValueError(f"toy config: optimizer must be 'sgd' or 'adam', got {cfg.optimizer!r}")


def train_curves(problem: dict[str, jax.Array], loss_name: str, beta: float,
                 cfg: ml_collections.ConfigDict) -> dict[str, jax.Array]:
    """Trains the softmax policy with one loss and records the log-ratios at every step.

    Pure and jittable (the step loop is a `lax.scan`); `vmap` over `problem` runs many seeds.

    Args:
      problem: output of `make_problem`.
      loss_name: a name registered in `mio_jax.losses` ("dpo", "mio", ...).
      beta: the loss's beta.
      cfg: toy config (`steps`, `optimizer`, `learning_rate`).

    Returns:
      dict of [S+1] arrays (index 0 = before training, i = after i steps), means over pairs:
      `chosen_logratio`, `rejected_logratio`, `chosen_logp`, and `loss` [S] (loss before step i+1).
    """
    features_nd = problem["features_nd"]
    chosen_p, rejected_p = problem["chosen_p"], problem["rejected_p"]
    theta0_d = problem["theta0_d"]
    ref_logp_n = jax.nn.log_softmax(features_nd @ theta0_d)
    opt = _optimizer(cfg)

    def logps(theta_d):
        return jax.nn.log_softmax(features_nd @ theta_d)

    def loss_fn(theta_d):
        logp_n = logps(theta_d)
        losses_p, _ = losses.compute(
            loss_name,
            policy_chosen_logps=logp_n[chosen_p],
            policy_rejected_logps=logp_n[rejected_p],
            ref_chosen_logps=ref_logp_n[chosen_p],
            ref_rejected_logps=ref_logp_n[rejected_p],
            beta=beta,
        )
        return losses_p.mean()

    def record(theta_d):
        z_n = logps(theta_d) - ref_logp_n
        return (z_n[chosen_p].mean(), z_n[rejected_p].mean(), logps(theta_d)[chosen_p].mean())

    def step(carry, _):
        theta_d, opt_state = carry
        loss, grad_d = jax.value_and_grad(loss_fn)(theta_d)
        updates, opt_state = opt.update(grad_d, opt_state, theta_d)
        theta_d = optax.apply_updates(theta_d, updates)
        return (theta_d, opt_state), (loss,) + record(theta_d)

    (_, _), (loss_s, zw_s, zl_s, lpw_s) = jax.lax.scan(
        step, (theta0_d, opt.init(theta0_d)), None, length=cfg.steps)
    zw0, zl0, lpw0 = record(theta0_d)
    cat = lambda first, rest: jnp.concatenate([first[None], rest])
    return dict(chosen_logratio=cat(zw0, zw_s), rejected_logratio=cat(zl0, zl_s),
                chosen_logp=cat(lpw0, lpw_s), loss=loss_s)


def run(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Runs every configured loss on seed `cfg.seed` (curves) and on seeds 0..num_seeds-1 (ends).

    Args:
      cfg: toy config (`get_config()`).

    Returns:
      JSON-ready dict:
        config: the settings;
        chosen_ceiling: mean -log pi_ref of seed `cfg.seed`'s chosen responses (with one pair,
          the largest chosen log-ratio possible);
        steps: the recorded steps (every `record_every` and the last);
        runs: {label: {loss, beta, fixed_point (ln2/beta for MIO, else None),
          curves {chosen_logratio, rejected_logratio, chosen_logp} at `steps`,
          loss_curve (loss before each recorded step but the last),
          ends_over_seeds {chosen_logratio, rejected_logratio} of seeds 0..num_seeds-1}}.
    """
    one = make_problem(jax.random.PRNGKey(cfg.seed), cfg)
    ref_logp_n = jax.nn.log_softmax(one["features_nd"] @ one["theta0_d"])
    # log pi <= 0 caps z_w at -log pi_ref(y_w): the chosen response holding all the mass.
    ceiling = float(-ref_logp_n[one["chosen_p"]].mean())
    kept = sorted(set(range(0, cfg.steps + 1, cfg.record_every)) | {cfg.steps})
    out: dict[str, Any] = {"config": cfg.to_dict(), "chosen_ceiling": ceiling, "steps": kept, "runs": {}}
    # Seeds 0..num_seeds-1 and, last, cfg.seed: one compiled vmapped run per loss gives both.
    keys = jax.vmap(jax.random.PRNGKey)(jnp.append(jnp.arange(cfg.num_seeds), cfg.seed))
    many = jax.vmap(lambda k: make_problem(k, cfg))(keys)
    for label, loss_name, beta in cfg.runs:
        fn = jax.jit(jax.vmap(lambda p, name=loss_name, b=beta: train_curves(p, name, b, cfg)))
        both = jax.device_get(fn(many))
        curves = {k: v[-1] for k, v in both.items()}
        ends = {k: v[:-1] for k, v in both.items()}
        out["runs"][label] = {
            "loss": loss_name,
            "beta": beta,
            "fixed_point": math.log(2.0) / beta if loss_name == "mio" else None,
            "curves": {k: np.asarray(v, np.float64)[kept].round(5).tolist()
                       for k, v in curves.items() if k != "loss"},
            "loss_curve": np.asarray(curves["loss"], np.float64)[np.asarray(kept[:-1])].round(6).tolist(),
            "ends_over_seeds": {k: np.asarray(ends[k][:, -1], np.float64).round(4).tolist()
                                for k in ("chosen_logratio", "rejected_logratio")},
        }
    return out


def plot(result: dict[str, Any]):
    """Figure of every run's chosen (solid) and rejected (dashed) log-ratio over steps.

    Args:
      result: output of `run`.

    Returns:
      a matplotlib Figure: all runs (left) and a zoom around MIO's range with the ln2/beta
      lines and, for one pair, the -log pi_ref(chosen) cap (right).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, r) in enumerate(result["runs"].items()):
        c = colors[i % len(colors)]
        zw, zl = r["curves"]["chosen_logratio"], r["curves"]["rejected_logratio"]
        for a in ax:
            a.plot(result["steps"], zw, color=c, label=f"{label} chosen")
            a.plot(result["steps"], zl, color=c, ls="--", label=f"{label} rejected")
        if r["fixed_point"] is not None:
            ax[1].axhline(r["fixed_point"], color=c, ls=":", lw=1, label=f"ln2/beta = {r['fixed_point']:.2f}")
    cfg = result["config"]
    if cfg["num_pairs"] == 1:  # with several pairs the chosen responses share the mass: no simple cap
        ax[1].axhline(result["chosen_ceiling"], color="black", ls=":", lw=1,
                      label=f"-log pi_ref(chosen) = {result['chosen_ceiling']:.2f}")
    ax[0].set_title(f"log-ratios z = log pi/pi_ref (seed {cfg['seed']}, {cfg['num_pairs']} pair(s))")
    ymin = min(min(r["curves"]["rejected_logratio"]) for r in result["runs"].values()
               if r["loss"] == "mio")
    ax[1].set_ylim(min(ymin, -1.0) - 1.0, max(8.0, result["chosen_ceiling"] + 1.0))
    ax[1].set_title("zoom on MIO")
    for a in ax:
        a.axhline(0.0, color="gray", lw=0.5)
        a.set_xlabel(f"step ({cfg['optimizer']}, lr {cfg['learning_rate']})")
        a.set_ylabel("log-ratio")
    ax[1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def summary_lines(result: dict[str, Any]) -> list[str]:
    """A printable table of start/end log-ratios and the median end over seeds."""
    lines = [f"{'run':<14}{'z_w end':>10}{'z_l end':>10}{'median z_w (seeds)':>20}{'median z_l':>12}"
             f"{'frac z_w>0':>12}"]
    for label, r in result["runs"].items():
        c, e = r["curves"], r["ends_over_seeds"]
        zw_e = np.asarray(e["chosen_logratio"])
        lines.append(f"{label:<14}{c['chosen_logratio'][-1]:>10.2f}{c['rejected_logratio'][-1]:>10.2f}"
                     f"{np.median(zw_e):>20.2f}{np.median(e['rejected_logratio']):>12.2f}"
                     f"{np.mean(zw_e > 0):>12.2f}")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m mio_jax.toy --out=DIR [--num_pairs=4 --optimizer=adam --learning_rate=1e-2
    ...]``; ``argv``: the arguments after the program name (default: the command line's)."""
    cli.run(_toy, FLAGS, __doc__, argv)


def _toy(args: list[str]) -> None:
    """Runs the toy with the parsed flags; writes the metrics and the figure."""
    cli.expect_no_arguments(args)
    cfg = get_config()
    cfg.update({k: FLAGS[k].value for k in cfg if k != "runs"})
    result = run(cfg)
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "metrics.json"), "w") as f:
        json.dump(result, f)
    plot(result).savefig(os.path.join(FLAGS.out, "toy.png"), dpi=110)
    print("\n".join(summary_lines(result)))
    print(f"wrote {FLAGS.out}/metrics.json and {FLAGS.out}/toy.png")


if __name__ == "__main__":
    main()
