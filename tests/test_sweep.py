"""The sweep: the validation-best cell of each method, and only it, reaches the test split;
finished pieces are kept and a rerun goes on where it stopped."""

import json

import pytest

from mio_jax import sweep

# made-up validation scores: per (method, lr, beta), per seed
VALIDATION = {
    ("mio", 1e-6, 0.1): [0.30, 0.34], ("mio", 1e-6, 0.5): [0.40, 0.20],
    ("mio", 2e-6, 0.1): [0.35, 0.37], ("mio", 2e-6, 0.5): [0.10, 0.12],
    ("dpo", 1e-6, 0.1): [0.25, 0.21], ("dpo", 1e-6, 0.5): [0.26, 0.24],
    ("dpo", 2e-6, 0.1): [0.29, 0.19], ("dpo", 2e-6, 0.5): [0.20, 0.20],
}


class Fake:
    """A runner and an evaluator that record their calls (and can fail once)."""

    def __init__(self, fail_at=None):
        self.runs, self.tests, self.fail_at = [], [], fail_at

    def runner(self, cell, seed, work):
        if (cell.name, seed) == self.fail_at:
            self.fail_at = None
            raise RuntimeError("killed")
        self.runs.append((cell.name, seed))
        return VALIDATION[(cell.method, cell.learning_rate, cell.beta)][seed % 2]

    def evaluator(self, cell, seed, work):
        self.tests.append((cell.name, seed))
        return 0.5 + seed / 100


def _sweep(fake, out):
    cells = sweep.grid(["mio", "dpo"], [1e-6, 2e-6], [0.1, 0.5])
    return sweep.run_sweep(cells, out=str(out), select_seeds=[0, 1], test_seeds=[0, 1, 2],
                           runner=fake.runner, evaluator=fake.evaluator)


def test_the_validation_best_cell_alone_is_evaluated_on_test(tmp_path):
    fake = Fake()
    result = _sweep(fake, tmp_path)
    # means: mio 0.32, 0.30, 0.36, 0.11 -> lr 2e-6 beta 0.1; dpo 0.23, 0.25, 0.24, 0.20
    assert {m: c["cell"] for m, c in result["chosen"].items()} == {
        "mio": "mio_lr2e-06_beta0.1", "dpo": "dpo_lr1e-06_beta0.5"}
    assert sorted(set(name for name, _ in fake.tests)) == ["dpo_lr1e-06_beta0.5",
                                                           "mio_lr2e-06_beta0.1"]
    assert sorted(fake.tests) == sorted((c, s) for c in ("dpo_lr1e-06_beta0.5",
                                                         "mio_lr2e-06_beta0.1")
                                        for s in (0, 1, 2))
    # every cell at the selection seeds, the chosen ones at the extra test seed too
    assert len(fake.runs) == 8 * 2 + 2
    assert result["chosen"]["mio"]["validation"] == pytest.approx(0.36)
    assert result["chosen"]["mio"]["test_mean"] == pytest.approx(0.51)
    assert "| mio | mio_lr2e-06_beta0.1 | 0.36 |" in sweep.format_table(result)


def test_min_mode_picks_the_smallest():
    scores = {sweep.Cell("m", 1.0, 0.1): [3.0], sweep.Cell("m", 2.0, 0.1): [1.0]}
    assert sweep.select(scores, "min")["m"].learning_rate == 2.0
    assert sweep.select(scores, "max")["m"].learning_rate == 1.0


def test_a_killed_sweep_resumes_without_rerunning_finished_pieces(tmp_path):
    first = Fake(fail_at=("dpo_lr2e-06_beta0.1", 1))
    with pytest.raises(RuntimeError):
        _sweep(first, tmp_path)
    again = Fake()
    result = _sweep(again, tmp_path)
    done = set(first.runs)
    assert not done & set(again.runs)  # nothing finished ran twice
    assert len(first.runs) + len(again.runs) == 8 * 2 + 2
    assert result == _sweep(Fake(), tmp_path)  # a third pass reads everything back
    stored = json.load(open(tmp_path / "mio_lr2e-06_beta0.1" / "mio_seed2" / "sweep_test.json"))
    assert stored == {"value": 0.52}


def test_last_eval_metric_reads_the_last_eval_row(tmp_path):
    rows = [{"split": "train", "step": 1, "loss": 1.0},
            {"split": "eval", "step": 1, "reasoning/accuracy": 0.25},
            {"split": "eval", "step": 2, "reasoning/accuracy": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sweep.last_eval_metric(str(tmp_path), "reasoning/accuracy") == 0.5
    with pytest.raises(sweep.InputError, match="no eval row with 'probe/loss'"):
        sweep.last_eval_metric(str(tmp_path), "probe/loss")
