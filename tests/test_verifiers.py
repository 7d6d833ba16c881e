"""Verifiers: answer extraction, number normalisation, reasoning-gym scoring, registry."""

import pytest
import reasoning_gym

from mio_jax import verifiers


@pytest.mark.parametrize("text, expected", [
    ("Let me think.\nThe answer is 1,200.0.", "1,200.0"),
    ("work\n#### 42", "42"),
    ("so it is \\boxed{-7} indeed", "-7"),
    ("<answer> 12 </answer> then 13", "12"),
    ("first <answer>1</answer> then <answer>2</answer>", "2"),
    ("Answer: blue", "blue"),
    ("line one\n\nlast line here\n", "last line here"),
    ("", None),
])
def test_extract_final_answer(text, expected):
    assert verifiers.extract_final_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("1,200.0", "1200"), ("$3.50", "3.5"), ("-0.0", "0"), ("10", "10"), ("x = 7.25 and 8.10", "8.1"),
    ("no digits", None),
])
def test_normalize_number(text, expected):
    assert verifiers.normalize_number(text) == expected


@pytest.mark.parametrize("completion, answer, score", [
    ("The answer is 1,200.", "1200", 1.0),
    ("#### 1200.0", "1,200", 1.0),
    ("3 + 4 = 7, and 7 * 2 = 14", "14", 1.0),  # last number
    ("The answer is 14. (I first thought 15)", "14", 1.0),  # marked answer beats the last number
    ("The answer is 15.", "14", 0.0),
    ("I don't know", "14", 0.0),
    ("The answer is -3", "3", 0.0),
])
def test_exact_number(completion, answer, score):
    assert verifiers.exact_number(completion, {"answer": answer}) == score


def test_exact_number_errors():
    with pytest.raises(KeyError, match="'answer'"):
        verifiers.exact_number("42", {"question": "q"})
    with pytest.raises(ValueError, match="holds no number"):
        verifiers.exact_number("42", {"answer": "blue"})


def test_exact_string():
    assert verifiers.exact_string("The answer is  Paris.", {"answer": "paris"}) == 1.0
    assert verifiers.exact_string("The answer is Lyon.", {"answer": "paris"}) == 0.0


def test_reasoning_gym_uses_the_task_scorer():
    entry = reasoning_gym.create_dataset("basic_arithmetic", size=2, seed=5)[1]
    assert entry["answer"] == "-27"
    row = {"task": "basic_arithmetic", **entry}
    assert verifiers.reasoning_gym("Working...\nThe answer is -27.", row) == 1.0
    assert verifiers.reasoning_gym("-9 - 6 = -15 ... so -27", row) == 1.0
    assert verifiers.reasoning_gym("The answer is -26.", row) == 0.0
    assert verifiers.reasoning_gym("", row) == 0.0
    # the task name may come from the metadata reasoning-gym writes
    assert verifiers.reasoning_gym("<answer>-27</answer>", dict(entry)) == 1.0


def test_reasoning_gym_non_numeric_task():
    entry = reasoning_gym.create_dataset("letter_counting", size=1, seed=3)[0]
    row = {"task": "letter_counting", **entry}
    right = verifiers.reasoning_gym(f"The answer is {entry['answer']}", row)
    wrong = verifiers.reasoning_gym("The answer is 9999", row)
    assert (right, wrong) == (1.0, 0.0)


def test_reasoning_gym_errors():
    with pytest.raises(KeyError, match="neither 'task'"):
        verifiers.reasoning_gym("1", {"answer": "1"})
    with pytest.raises(ValueError, match="unknown reasoning-gym task 'no_such_task'"):
        verifiers.reasoning_gym("1", {"task": "no_such_task", "answer": "1"})


def test_registry():
    assert verifiers.names() == ["exact_number", "exact_string", "reasoning_gym"]
    assert verifiers.get("exact_number") is verifiers.exact_number
    fn = verifiers.get("mio_jax.verifiers:exact_string")
    assert fn("The answer is x", {"answer": "X"}) == 1.0
    with pytest.raises(ValueError, match="unknown verifier 'nope'"):
        verifiers.get("nope")
    with pytest.raises(ValueError, match="cannot import 'f' from module 'no_such_module_xyz'"):
        verifiers.get("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="not callable"):
        verifiers.get("math:pi")
