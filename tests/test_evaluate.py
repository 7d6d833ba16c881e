"""Evaluation: Wilson intervals, pass@k, per-task accuracy on fixed predictions, held-out seeds."""

import json
import math

import numpy as np
import pytest
import reasoning_gym

from mio_jax import evaluate, heldout


def _wilson_by_quadratic(x, n, z=1.959963984540054):
    # The Wilson interval is the set of pi with |p - pi| <= z sqrt(pi (1 - pi) / n):
    # roots of (1 + z^2/n) pi^2 - (2p + z^2/n) pi + p^2 = 0.
    p = x / n
    lo, hi = sorted(np.roots([1 + z * z / n, -(2 * p + z * z / n), p * p]).real)
    return lo, hi


@pytest.mark.parametrize("x, n", [(7, 10), (1, 3), (50, 100), (99, 100), (3, 1000)])
def test_wilson_matches_the_quadratic(x, n):
    np.testing.assert_allclose(evaluate.wilson_interval(x, n), _wilson_by_quadratic(x, n), rtol=1e-9)


def test_wilson_known_values():
    z2 = 1.959963984540054 ** 2
    lo, hi = evaluate.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(z2 / (10 + z2), rel=1e-12)  # 0.27753...
    lo, hi = evaluate.wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(10 / (10 + z2), rel=1e-12)
    # scipy.stats.binomtest(x, n).proportion_ci(method="wilson"), scipy 1.x, recorded here
    np.testing.assert_allclose(evaluate.wilson_interval(7, 10), (0.39677814746114526, 0.892208732593699),
                               rtol=1e-12)
    np.testing.assert_allclose(evaluate.wilson_interval(3, 4), (0.30064184258240184, 0.9544127391902995),
                               rtol=1e-12)
    with pytest.raises(ValueError, match="n must be positive"):
        evaluate.wilson_interval(0, 0)
    with pytest.raises(ValueError, match="outside"):
        evaluate.wilson_interval(11, 10)


@pytest.mark.parametrize("n, c, k", [(10, 3, 1), (10, 3, 2), (10, 3, 8), (10, 0, 5), (20, 19, 1),
                                     (100, 7, 10), (5, 5, 5)])
def test_pass_at_k_closed_form(n, c, k):
    expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    assert evaluate.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_exact_small_cases():
    assert evaluate.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert evaluate.pass_at_k(10, 3, 2) == pytest.approx(24 / 45)
    assert evaluate.pass_at_k(4, 2, 3) == 1.0
    with pytest.raises(ValueError):
        evaluate.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        evaluate.pass_at_k(4, 1, 5)


@pytest.fixture(scope="module")
def examples():
    arith = heldout.reasoning_gym_examples("basic_arithmetic", 4, seed=7)
    chain = heldout.reasoning_gym_examples("chain_sum", 3, seed=7)
    return arith + chain


def test_evaluate_predictions_per_task(examples):
    # basic_arithmetic: 3 of 4 right (greedy); chain_sum: 1 of 3 right.
    right = lambda ex: f"Step by step...\nThe answer is {ex['answer']}."
    wrong = lambda ex: f"The answer is {int(ex['answer']) + 1}."
    texts = [right, right, wrong, right, wrong, right, wrong]
    comps = [[f(ex)] for f, ex in zip(texts, examples)]
    out = evaluate.evaluate_predictions(comps, examples, "reasoning_gym")
    a, c, o = out["tasks"]["basic_arithmetic"], out["tasks"]["chain_sum"], out["overall"]
    assert (a["n"], a["correct"], c["n"], c["correct"], o["n"], o["correct"]) == (4, 3, 3, 1, 7, 4)
    assert a["accuracy"] == 0.75 and c["accuracy"] == pytest.approx(1 / 3)
    np.testing.assert_allclose(a["ci95"], _wilson_by_quadratic(3, 4), rtol=1e-9)
    np.testing.assert_allclose(o["ci95"], _wilson_by_quadratic(4, 7), rtol=1e-9)
    assert o["pass@1"] == pytest.approx(4 / 7)
    table = evaluate.format_table(out)
    assert "basic_arithmetic" in table and "0.750" in table and "overall" in table


def test_evaluate_predictions_pass_at_k(examples):
    ex = examples[:2]
    # example 0: 2 of 4 samples right (sample 0 wrong); example 1: 4 of 4 right.
    r0 = f"The answer is {ex[0]['answer']}"
    w0 = "The answer is 123456789"
    r1 = f"#### {ex[1]['answer']}"
    comps = [[w0, r0, w0, r0], [r1, r1, r1, r1]]
    out = evaluate.evaluate_predictions(comps, ex, "reasoning_gym", pass_k=2)
    o = out["overall"]
    assert o["correct"] == 1 and o["samples"] == 4  # accuracy uses sample 0
    p0 = 1 - math.comb(2, 2) / math.comb(4, 2)  # 5/6
    assert o["pass@2"] == pytest.approx((p0 + 1.0) / 2)
    assert o["pass@2_stderr"] == pytest.approx(np.std([p0, 1.0], ddof=1) / math.sqrt(2))


def test_evaluate_predictions_errors(examples):
    with pytest.raises(ValueError, match="2 completion lists for 7 examples"):
        evaluate.evaluate_predictions([["a"], ["b"]], examples, "reasoning_gym")
    with pytest.raises(ValueError, match="same n"):
        evaluate.evaluate_predictions([["a"], ["b", "c"]], examples[:2], "reasoning_gym")


def test_heldout_seeds_are_disjoint_from_training():
    held = heldout.heldout_examples("chain_sum", 3, seed=0)
    direct = reasoning_gym.create_dataset("chain_sum", size=3, seed=10**9)
    assert [e["question"] for e in held] == [e["question"] for e in direct]
    heldout.check_training_seeds(1234, 4000)  # the committed data set's seeds
    with pytest.raises(ValueError, match="held out for evaluation"):
        heldout.check_training_seeds(10**9 - 5, 10)


def test_validation_and_test_splits_draw_disjoint_item_seeds():
    """Validation items come from Random(1e9 + seed + i), test items from
    Random(1.5e9 + seed + i); a seed that would let one split reach the other is refused."""
    val = heldout.heldout_examples("chain_sum", 3, seed=7)
    test = heldout.heldout_examples("chain_sum", 3, seed=7, split="test")
    want = reasoning_gym.create_dataset("chain_sum", size=3, seed=1_500_000_007)
    assert [e["question"] for e in test] == [e["question"] for e in want]
    assert [e["question"] for e in val] != [e["question"] for e in test]
    bases = sorted(heldout.HELD_OUT_SPLITS.values())
    assert bases[0] == heldout.EVAL_SEED_BASE  # training seeds stay below both
    assert bases[1] - bases[0] == heldout.SPLIT_SPAN  # [base, base + span) never overlap
    with pytest.raises(ValueError, match="leaves the validation split"):
        heldout.heldout_examples("chain_sum", 10, seed=heldout.SPLIT_SPAN - 5)
    with pytest.raises(ValueError, match="expected one of"):
        heldout.heldout_examples("chain_sum", 1, seed=0, split="train")


def test_every_problem_keeps_its_verdicts(examples):
    """evaluate() stores, per problem, its task and the verdict of each completion; the
    verdicts are what the metrics count."""
    answers = {e["question"]: e["answer"] for e in examples}

    def sampler(prompts):  # right on even problems, and only the first of two samples
        out = []
        for i, p in enumerate(prompts):
            q = p[-1]["content"]
            good = list(answers).index(q) % 2 == 0 and i % 2 == 0
            out.append(f"The answer is {answers[q] if good else 'nothing'}.")
        return out

    result = evaluate.evaluate(sampler, examples, "reasoning_gym", samples=2, pass_k=2)
    rows = result["completions"]
    assert [r["correct"] for r in rows] == [[i % 2 == 0, False] for i in range(len(examples))]
    assert all(r["task"] == evaluate.task_name(e) for r, e in zip(rows, examples))
    assert result["overall"]["correct"] == sum(r["correct"][0] for r in rows)


def test_task_config_sets_the_difficulty():
    cfg = heldout.parse_task_config('{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, '
                                     '"operators": ["+"], "allow_negation": false}')
    assert cfg["operators"] == ("+",) and heldout.parse_task_config("") == {}
    easy = heldout.heldout_examples("basic_arithmetic", 6, seed=3, task_config=cfg)
    direct = reasoning_gym.create_dataset("basic_arithmetic", size=6, seed=10**9 + 3, **cfg)
    assert [e["question"] for e in easy] == [e["question"] for e in direct]
    for e in easy:  # two single-digit terms added: |answer| is at most 18
        assert abs(int(e["answer"])) <= 18 and e["question"].count("+") == 1
    with pytest.raises(ValueError, match="expected a JSON object"):
        heldout.parse_task_config("[1, 2]")
    with pytest.raises(ValueError, match="not valid JSON"):
        heldout.parse_task_config("{max_digits: 1}")
    with pytest.raises(ValueError, match="'basic_arithmetic' with config"):
        heldout.reasoning_gym_examples("basic_arithmetic", 2, 0, {"max_digitz": 1})


def test_evaluate_with_a_sampler_and_jsonl(tmp_path):
    path = tmp_path / "q.jsonl"
    rows = [{"question": "2+2?", "answer": "4"}, {"question": "3*3?", "answer": "9"},
            {"question": "10-1?", "answer": "9"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    examples = evaluate.jsonl_examples(str(path))
    answers = {"2+2?": "The answer is 4.", "3*3?": "3*3 = 9", "10-1?": "The answer is 8."}
    seen = []

    def sampler(prompts):
        seen.extend(prompts)
        return [answers[p[-1]["content"]] for p in prompts]

    out = evaluate.evaluate(sampler, examples, "exact_number")
    assert out["tasks"]["jsonl"]["correct"] == 2 and out["tasks"]["jsonl"]["n"] == 3
    assert seen[0][0]["role"] == "system" and seen[0][1] == {"role": "user", "content": "2+2?"}
    assert out["completions"][2]["completions"] == ["The answer is 8."]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing key 'answer'"):
        evaluate.jsonl_examples(str(bad))


def test_cli_with_a_real_tiny_model(tmp_path):
    """The CLI end to end: a random 2-layer Llama written by the models exporter, sampled."""
    from mio_jax import testing

    from mio_jax import verifiers

    model = testing.write_tiny_model(str(tmp_path / "model"), max_position_embeddings=256)
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "1+1=", "answer": "2"}\n{"question": "2+5=", "answer": "7"}\n')
    out = tmp_path / "eval.json"
    evaluate.main([f"--model={model}", f"--jsonl={data}", "--samples=3", "--pass_k=2",
                   "--temperature=5.0", "--max_new_tokens=6", "--system=", f"--out={out}"])
    report = json.loads(out.read_text())
    res = report["results"]["jsonl"]
    assert report["eval_seed_base"] == 10**9 and res["overall"]["n"] == 2
    comps = [c["completions"] for c in res["completions"]]
    assert [len(c) for c in comps] == [3, 3]
    # the random tiny model is very peaked (p(newline) ~ 1), hence temperature 5 to see samples differ
    assert len(set(comps[0] + comps[1])) > 1
    rescored = [[verifiers.exact_number(t, ex) for t in c]
                for c, ex in zip(comps, [{"answer": "2"}, {"answer": "7"}])]
    assert res["overall"]["correct"] == sum(r[0] for r in rescored)
    expected = sum(evaluate.pass_at_k(3, int(sum(r)), 2) for r in rescored) / 2
    assert res["overall"]["pass@2"] == pytest.approx(expected)
