"""On-policy pair building with a sampler whose answers are known."""

import gzip
import json

import pytest
import reasoning_gym

from mio_jax import heldout, pairs
from mio_jax.data import formats, report

SYSTEM = heldout.DEFAULT_SYSTEM


@pytest.fixture(scope="module")
def examples():
    return heldout.reasoning_gym_examples("chain_sum", 5, seed=11)


def _plan(examples):
    """Per question, the K = 4 answers the stand-in model gives (R = right, W = wrong)."""
    ans = {ex["question"]: int(ex["answer"]) for ex in examples}
    r = lambda q, how="The answer is {}.": how.format(ans[q])
    w = lambda q, d: f"The answer is {ans[q] + d}."
    q = [ex["question"] for ex in examples]
    return {
        q[0]: [r(q[0]), w(q[0], 1), r(q[0], "so it is {}"), w(q[0], 2)],  # 2 right, 2 wrong
        q[1]: [r(q[1])] * 4,  # all right
        q[2]: [w(q[2], 1), w(q[2], 3), w(q[2], 5), w(q[2], 7)],  # none right
        q[3]: [w(q[3], 1), w(q[3], 1), r(q[3]), w(q[3], 4)],  # 1 right, a repeated wrong one
        q[4]: [w(q[4], 9), r(q[4]), r(q[4]), w(q[4], 9)],  # identical texts repeat
    }


class ScriptedSampler:
    """Answers each question with its next planned answer (a deterministic stand-in model)."""

    def __init__(self, plan):
        self.plan, self.used, self.calls = plan, {}, []

    def __call__(self, prompts):
        self.calls.append(len(prompts))
        out = []
        for p in prompts:
            assert p[0] == {"role": "system", "content": SYSTEM} and p[1]["role"] == "user"
            q = p[1]["content"]
            i = self.used.get(q, 0)
            self.used[q] = i + 1
            out.append(self.plan[q][i])
        return out


def test_pairs_mode_counts_and_rows(examples):
    plan = _plan(examples)
    sampler = ScriptedSampler(plan)
    rows, stats = pairs.build(sampler, examples, "reasoning_gym", num_samples=4, mode="pairs",
                              pairs_per_prompt=0, batch_size=2, progress=False)
    assert sampler.calls == [8, 8, 4]  # 2 prompts x 4 samples per call
    assert stats == dict(prompts=5, samples=20, correct=2 + 4 + 0 + 1 + 2, incorrect=2 + 0 + 4 + 3 + 2,
                         all_correct=1, none_correct=1, prompts_with_rows=3, rows=4 + 2 + 1)
    q = [ex["question"] for ex in examples]
    got = [(r["prompt"][1]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows]
    p0, p3, p4 = plan[q[0]], plan[q[3]], plan[q[4]]
    assert got == [
        (q[0], p0[0], p0[1]), (q[0], p0[0], p0[3]), (q[0], p0[2], p0[1]), (q[0], p0[2], p0[3]),
        (q[3], p3[2], p3[0]), (q[3], p3[2], p3[3]),  # the repeated wrong answer gives one pair
        (q[4], p4[1], p4[0]),  # identical right and wrong texts give one pair
    ]
    assert rows[0]["task"] == "chain_sum" and rows[0]["answer"] == examples[0]["answer"]
    assert (rows[0]["chosen_score"], rows[0]["rejected_score"]) == (1.0, 0.0)
    # the data package reads every row as one (chosen, rejected) group
    log = report.BadRowLog(policy="error")
    for i, row in enumerate(rows):
        (group,) = formats.normalize_row(row, f"rows[{i}]", formats.detect_format(row), log)
        assert group.completions == (row["chosen"], row["rejected"]) and group.chat


def test_pairs_per_prompt_limit(examples):
    rows, stats = pairs.build(ScriptedSampler(_plan(examples)), examples, "reasoning_gym", num_samples=4,
                              mode="pairs", pairs_per_prompt=1, batch_size=5, progress=False)
    assert stats["rows"] == len(rows) == 3 and stats["prompts_with_rows"] == 3


def test_group_mode_rows(examples):
    plan = _plan(examples)
    rows, stats = pairs.build(ScriptedSampler(plan), examples, "reasoning_gym", num_samples=4,
                              mode="group", batch_size=3, progress=False)
    assert (stats["rows"], stats["all_correct"], stats["none_correct"]) == (3, 1, 1)
    q = [ex["question"] for ex in examples]
    texts = [[c[0]["content"] for c in r["completions"]] for r in rows]
    assert texts == [[plan[q[0]][0], plan[q[0]][1], plan[q[0]][3]],
                     [plan[q[3]][2], plan[q[3]][0], plan[q[3]][3]],
                     [plan[q[4]][1], plan[q[4]][0]]]
    assert [r["scores"] for r in rows] == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0]]
    log = report.BadRowLog(policy="error")
    (group,) = formats.normalize_row(rows[0], "rows[0]", formats.detect_format(rows[0]), log,
                                     kway_mode="group", num_negatives=3)
    assert len(group.completions) == 3 and group.completions[0] == rows[0]["completions"][0]
    limited, _ = pairs.build(ScriptedSampler(plan), examples, "reasoning_gym", num_samples=4,
                             mode="group", num_negatives=1, progress=False)
    assert [len(r["completions"]) for r in limited] == [2, 2, 2]


def test_run_writes_rows_and_stats(tmp_path, examples):
    cfg = pairs.default_config()
    cfg.tasks, cfg.num_prompts, cfg.seed, cfg.num_samples = "chain_sum", 5, 11, 4
    cfg.out = str(tmp_path / "out" / "pairs.jsonl.gz")
    result = pairs.run(cfg, sampler=ScriptedSampler(_plan(examples)), progress=False)
    with gzip.open(cfg.out, "rt") as f:
        written = [json.loads(line) for line in f]
    assert len(written) == result["stats"]["rows"] == 3
    with open(cfg.out + ".stats.json") as f:
        assert json.load(f)["stats"]["none_correct"] == 1


def test_task_config_reaches_the_prompts():
    cfg = pairs.default_config()
    cfg.tasks, cfg.num_prompts, cfg.seed = "basic_arithmetic", 4, 5
    cfg.task_config = '{"min_terms": 2, "max_terms": 2, "max_digits": 1, "operators": ["+"]}'
    ((examples, verifier),) = pairs.load_examples(cfg)
    direct = reasoning_gym.create_dataset("basic_arithmetic", size=4, seed=5, min_terms=2, max_terms=2,
                                          max_digits=1, operators=("+",))
    assert verifier == "reasoning_gym"
    assert [e["question"] for e in examples] == [e["question"] for e in direct]


def test_bad_settings(tmp_path, examples):
    with pytest.raises(ValueError, match="num_samples must be >= 2"):
        pairs.build(ScriptedSampler({}), examples, "reasoning_gym", num_samples=1, mode="pairs")
    with pytest.raises(ValueError, match=r"mode must be one of \('pairs', 'best_worst', 'length_matched', 'group'\)"):
        pairs.build(ScriptedSampler({}), examples, "reasoning_gym", num_samples=2, mode="triples")
    cfg = pairs.default_config()
    cfg.seed = 10**9
    with pytest.raises(ValueError, match="held out for evaluation"):
        pairs.load_examples(cfg)
    conf = tmp_path / "c.py"
    conf.write_text("import ml_collections\ndef get_config():\n"
                    "    return ml_collections.ConfigDict({'num_samples': 3, 'temprature': 1.0})\n")
    with pytest.raises(ValueError, match="unknown pairs config key 'temprature'"):
        pairs.parse_config([f"--config={conf}"])
    conf.write_text("import ml_collections\ndef get_config():\n"
                    "    return ml_collections.ConfigDict({'num_samples': 3, 'mode': 'group'})\n")
    cfg = pairs.parse_config([f"--config={conf}", "--num_samples=6"])
    assert (cfg.num_samples, cfg.mode, cfg.temperature) == (6, "group", 0.8)


def test_cli_with_a_real_tiny_model(tmp_path):
    """`python -m mio_jax.pairs` end to end with the real sampler on a random tiny Llama."""
    from mio_jax import testing

    model = testing.write_tiny_model(str(tmp_path / "model"), max_position_embeddings=256)
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "1+1=", "answer": "2"}\n{"question": "2+5=", "answer": "7"}\n')
    out = tmp_path / "pairs.jsonl"
    pairs.main([f"--model={model}", "--tasks=", f"--jsonl={data}", "--num_samples=3",
                "--temperature=5.0", "--max_new_tokens=4", "--system=", f"--out={out}"])
    with open(f"{out}.stats.json") as f:
        s = json.load(f)["stats"]
    assert (s["prompts"], s["samples"], s["correct"] + s["incorrect"]) == (2, 6, 6)
    assert s["all_correct"] + s["none_correct"] + s["prompts_with_rows"] == 2
    assert len(out.read_text().splitlines()) == s["rows"]


def test_best_worst_pairs_the_best_correct_with_the_worst_incorrect_answer():
    prompt = [{"role": "user", "content": "q"}]
    ex = {"question": "q", "answer": "1"}
    rows = pairs.rows_for_prompt(prompt, ex, ["a", "b", "c", "d"], [0.5, 1.0, 0.0, 1.0],
                                 mode="best_worst")
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [("b", "c")]
    assert (rows[0]["chosen_score"], rows[0]["rejected_score"]) == (1.0, 0.0)
    assert pairs.rows_for_prompt(prompt, ex, ["a", "b"], [1.0, 1.0], mode="best_worst") == []


def test_length_matched_pairs_the_first_correct_with_the_incorrect_of_closest_length():
    prompt, ex = [{"role": "user", "content": "q"}], {"answer": "3", "task": "t"}
    texts = ["wrong, long answer", "ok 3", "no", "bad!", "also 3"]
    rows = pairs.rows_for_prompt(prompt, ex, texts, [0.0, 1.0, 0.0, 0.0, 1.0],
                                 mode="length_matched")
    # the first correct "ok 3" (4 characters): "bad!" (4) beats "no" (2) and the long one
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [
        ("ok 3", "bad!")]
    assert pairs.rows_for_prompt(prompt, ex, ["a", "b"], [0.0, 0.0], mode="length_matched") == []
