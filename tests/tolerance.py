"""How far apart two float32 training runs may be when they differ only in rounding.

Two runs of the same data and weights differ in the last bits whenever their sums run in
another order: another CPU's vector width (XLA:CPU vectorises differently for AVX-512, AVX2
and SSE4.2, with or without FMA), another sharding or process count, a resumed run's fresh
compilation. The tolerances below follow from the sizes of the quantities compared, not from
one machine's rounding:

- **Sequence log-probs.** A sequence log-prob sums L per-token log-softmax values; each is a
  difference of numbers of the logits' size, so a reordered sum moves it by a few units of
  float32 roundoff ``U32`` times its own magnitude, and the sum by a few ``U32 * |logp|``.
  Every Adam update then starts from weights that already differ at that level and adds its
  own, so the difference grows about linearly with the updates: ``logp_atol`` allows
  ``ULPS_PER_UPDATE`` units of ``U32 * |logp|`` per update, counting the forward as one.
  (Measured on the golden tiny runs, |logp| ~ 250, 4 updates, across AVX-512, AVX2 and
  SSE4.2: at most 1.4e-4 = 1.9 units per update; the allowance is 8.)
- **Rewards** are ``beta`` times the difference of the policy's and the reference's log-probs,
  two such sums rounded independently: ``2 * beta * logp_atol``. Margins are differences of
  two rewards; every loss here (MIO, DPO, SimPO and the rest of the pairwise family) and the
  MI estimates change by at most 1 per unit of each reward, hence ``2 * reward_atol``.
- **Norms** (gradient, parameter, update) are compared relatively: a gradient is the
  backward of the same sums, a few units of roundoff per update again, with cancellation
  between the chosen and rejected terms; ``NORM_ULPS_PER_UPDATE`` units per update.
- **Weights.** Adam moves a weight by at most about the learning rate per update whatever
  the gradient's size, and rounding changes an update noticeably only where the gradient
  itself is at rounding level (m / (sqrt(v) + eps) with g ~ eps); ``weight_atol`` allows
  1/64 of the largest possible move, ``lr * updates / 64`` (measured: at most 1/200 of it,
  one weight in 3072 of the tiny run with the completion-only projection). A tensor's sum and sum of
  squares then move by at most ``sqrt(n)`` such steps (independent signs) and
  ``2 * ||w|| * sqrt(n)`` of them.
- **Discrete metrics** (reward accuracies; counts of tokens, groups, clipped or dropped items)
  are step functions of continuous values: compared exactly where those values are clear of
  the threshold. Counts of tokens and groups come from the data alone and are always exact;
  a reward accuracy is exact unless some pair's margin lies within its tolerance of zero,
  which happens by construction while the policy still equals the reference (the first
  step of a run with a frozen reference: every margin is zero up to rounding).

- **Policy-gradient rows** (GRPO rounds) have no sequence log-probs: their quantities are
  per-token means. A token's log-prob and its distribution's entropy (lse - E_p[z]) are
  differences of numbers of the logits' size, at most ``TOKEN_SCALE`` for the models tested,
  so each moves by ``logp_atol(TOKEN_SCALE, updates)``; the k3 KL term changes by at most
  about as much per unit of its log-ratio; the loss is a mean of ratios exp(logp - old)
  times advantages of at most ``ADVANTAGE_SCALE`` (group-normalised rewards of G <= 16
  answers), each ratio's log moving by two such differences. A clip ratio counts tokens
  whose ratio is beyond 1 +- epsilon: a token within rounding of the boundary may count on
  either side, so it may move by one token's share, ``1 / completion_tokens``.

A real regression moves these numbers by far more: one token more or less in a sequence moves
its log-prob by about |logp| / L (~15 on the tiny runs, against an allowance of ~1e-3), a wrong
mask or a wrong loss term moves the rewards and the loss by 1e-2 and more.
"""

import math

import jax
import numpy as np

U32 = 2.0 ** -24                  # float32 unit roundoff
ULPS_PER_UPDATE = 8               # log-probs: units of U32 * |logp| per update (forward = 1)
NORM_ULPS_PER_UPDATE = 32         # relative, per update, of gradient/parameter/update norms
WEIGHT_MOVE_FRACTION = 1.0 / 64   # of the largest possible Adam move, lr * updates
INIT_ULPS = 4                     # an initialised weight: units of U32 * |w|

# metrics that come from the data alone: equal in any two runs of the same data
EXACT = {"completion_tokens", "num_groups", "num_tokens", "step"}
# greedy answers: the same tokens, so the same counts (a near-tie argmax would show as a
# changed answer in the tests that also compare the texts)
EXACT_PREFIXES = ("reasoning/",)
# step functions of rewards: exact where every margin is clear of zero
THRESHOLDED = {"rewards/accuracies"}
# policy-gradient rows: the size of a logit (and so of a token log-prob or an entropy's two
# terms) for the models tested, and of a group-normalised advantage
TOKEN_SCALE = 32.0
ADVANTAGE_SCALE = 4.0
# timing: never equal between two runs
TIMING = {"tokens_per_sec", "tokens_per_sec_per_device", "tflops_per_sec_per_device", "mfu"}


def logp_atol(logp: float, updates: int) -> float:
    """Allowed difference of a sequence log-prob (sum) of magnitude ``|logp|`` after
    ``updates`` optimizer updates."""
    return ULPS_PER_UPDATE * U32 * abs(logp) * (1 + updates)


def reward_atol(logp: float, beta: float, updates: int) -> float:
    """Allowed difference of ``beta * (logp_policy - logp_reference)``."""
    return 2.0 * beta * logp_atol(logp, updates)


def norm_rtol(updates: int) -> float:
    """Allowed relative difference of a gradient, parameter or update norm."""
    return NORM_ULPS_PER_UPDATE * U32 * (1 + updates)


def weight_atol(learning_rate: float, updates: int) -> float:
    """Allowed difference of one weight after ``updates`` Adam updates at ``learning_rate``
    (the peak of the schedule)."""
    return WEIGHT_MOVE_FRACTION * learning_rate * max(updates, 1)


def init_stat_atols(n: int, sum_sq: float):
    """Allowed differences of a freshly initialised tensor's (sum, sum of squares) of ``n``
    weights. An initialiser computes each weight with a few float32 operations (a uniform
    draw, an inverse error function, a scale), which another compilation (vector width,
    fused multiply-adds, optimisation level) rounds differently: each weight moves by at
    most ``INIT_ULPS`` units of roundoff of itself. So the sum moves by at most
    ``INIT_ULPS * U32 * sum |w| <= INIT_ULPS * U32 * sqrt(n * sum_sq)`` and the sum of
    squares by ``2 * INIT_ULPS * U32 * sum_sq``. Another seed or initialiser moves the sum
    by about ``sqrt(sum_sq)``, orders of magnitude more."""
    bound = INIT_ULPS * U32
    return bound * math.sqrt(n * max(sum_sq, 0.0)), 2.0 * bound * max(sum_sq, 0.0)


def tensor_stat_atols(n: int, sum_sq: float, learning_rate: float, updates: int):
    """Allowed differences of a tensor's (sum, sum of squares) of ``n`` weights."""
    w = weight_atol(learning_rate, updates)
    return math.sqrt(n) * w, 2.0 * math.sqrt(max(sum_sq, 0.0)) * math.sqrt(n) * w


def metric_atol(key: str, row: dict, beta: float, updates: int) -> float | None:
    """Allowed absolute difference of a continuous metric ``key`` of a metrics row (train or
    eval) after ``updates`` updates; None for keys compared otherwise (exact, thresholded,
    timing)."""
    if key in EXACT or key in THRESHOLDED or key in TIMING or key.startswith(EXACT_PREFIXES):
        return None
    level = max(abs(row.get("logps/chosen", 0.0)), abs(row.get("logps/rejected", 0.0)))
    value = abs(row[key])
    if "clip_ratio/region_mean" in row or "cispo_clip_ratio" in row or (
            "entropy" in row and "logps/chosen" not in row):  # a policy-gradient step's row
        token = logp_atol(TOKEN_SCALE, updates)
        if key.startswith("clip_ratio/") or key == "cispo_clip_ratio":
            return 1.0 / max(row.get("completion_tokens", 1.0), 1.0)
        if key in ("entropy", "kl"):
            return token
        if key == "loss":
            return 2.0 * ADVANTAGE_SCALE * token
    if key.startswith("logps/"):
        return logp_atol(level, updates)
    if key in ("rewards/chosen", "rewards/rejected"):
        return reward_atol(level, beta, updates)
    if key == "rewards/margins" or key == "loss" or key.startswith(("loss/", "mi/")):
        return 2.0 * reward_atol(level, beta, updates)
    if key in ("grad_norm", "param_norm", "update_norm"):
        return norm_rtol(updates) * value
    if key == "learning_rate":  # the schedule in float32 from the step alone
        return 4 * U32 * value
    # anything else continuous (WPO weights, an online round's statistics and log-ratios,
    # ...): relatively at the norms' allowance, plus a reward-sized absolute term
    return norm_rtol(updates) * value + logp_atol(level, updates) * beta


def policy_is_reference(row: dict, beta: float, updates: int) -> bool:
    """True where every reward is at rounding level: the policy equals the reference (the
    first steps of a frozen-reference run), so each margin's sign is rounding's choice."""
    level = max(abs(row.get("logps/chosen", 0.0)), abs(row.get("logps/rejected", 0.0)))
    tol = reward_atol(level, beta, updates)
    return all(abs(row.get(k, 0.0)) <= tol for k in ("rewards/chosen", "rewards/rejected"))


def assert_rows_close(got: dict, want: dict, *, beta: float, updates: int,
                      what: str = "", margins=None, keys=None) -> float:
    """Asserts two metrics rows agree key by key under the rules above; returns the largest
    absolute difference of a continuous metric.

    ``margins``: the per-pair reward margins behind the row where the caller knows them
    (then a thresholded metric is compared exactly only if all are clear of zero);
    ``keys``: compare only these (the tolerances still come from the whole row)."""
    if keys is None:
        assert got.keys() - TIMING == want.keys() - TIMING, (what, got.keys() ^ want.keys())
        keys = want.keys() - TIMING
    worst = 0.0
    for key in sorted(k for k in keys if k in want):  # eval rows have no grad_norm
        a, b = got[key], want[key]
        if not isinstance(b, (int, float)) or isinstance(b, bool):
            assert a == b, f"{what}: {key} {a!r} != {b!r}"
            continue
        if key in THRESHOLDED:
            if margins is not None:
                tol = 2.0 * reward_atol(max(abs(want.get("logps/chosen", 0.0)),
                                            abs(want.get("logps/rejected", 0.0))), beta, updates)
                if min(abs(float(m)) for m in margins) <= tol:
                    continue  # some pair at a tie: its sign is rounding's choice
            elif policy_is_reference(want, beta, updates):
                continue  # every pair at a tie (the policy is the reference)
            assert a == b, f"{what}: {key} {a} != {b} (margins clear of zero)"
            continue
        tol = metric_atol(key, want, beta, updates)
        if tol is None:
            assert a == b, f"{what}: {key} {a} != {b}"
            continue
        if math.isnan(b):
            assert math.isnan(a), f"{what}: {key} {a} != nan"
            continue
        assert abs(a - b) <= tol, f"{what}: {key} {a!r} == {b!r} +- {tol:.3g}"
        worst = max(worst, abs(a - b))
    return worst


def assert_params_close(a, b, *, learning_rate: float, updates: int, what: str = "") -> float:
    """Asserts two parameter pytrees (or dicts of arrays) agree to ``weight_atol``; returns
    the largest difference."""
    tol = weight_atol(learning_rate, updates)
    la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb], what
    worst = 0.0
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        np.testing.assert_allclose(x, y, rtol=0, atol=tol,
                                   err_msg=f"{what} {jax.tree_util.keystr(path)}")
        worst = max(worst, float(np.max(np.abs(x - y), initial=0.0)))
    return worst


def assert_results_close(a: dict, b: dict, *, beta: float, learning_rate: float, steps: int,
                         keys=None, params: bool = True) -> None:
    """Two ``train.train_and_evaluate`` results of ``steps`` steps agree: the last train
    metrics (computed after ``steps - 1`` updates), the final eval metrics and the trained
    parameters (after ``steps`` updates). ``keys`` limits the metrics compared."""
    for split, updates in (("train", steps - 1), ("eval", steps)):
        if not b.get(split):
            continue
        assert_rows_close(a[split], b[split], beta=beta, updates=updates, what=split, keys=keys)
    if params:
        assert_params_close(jax.device_get(a["state"].params), jax.device_get(b["state"].params),
                            learning_rate=learning_rate, updates=steps, what="params")
