"""Builds the committed reasoning preference set from `reasoning-gym` problems.

Each pair: a verifiable problem (gsm_symbolic, basic_arithmetic, chain_sum)
as a system + user prompt; chosen = a short worked solution ending in
"The answer is N." that the task's own `score_answer` accepts; rejected = the
same worked style with one wrong arithmetic step carried through to a wrong
final answer, which `score_answer` rejects. Conversational format.

Regenerate (from the repository root; needs `pip install reasoning-gym`):

    python -m mio_jax.data.build_reasoning_prefs --out_dir=mio_jax/data/assets

Deterministic: same seeds and package versions give the same files.
"""

import ast
import fractions
import gzip
import json
import os
import random
import re
from typing import Sequence

from absl import flags

from mio_jax import cli
from mio_jax.heldout import DEFAULT_SYSTEM as SYSTEM
TASKS = ("gsm_symbolic", "basic_arithmetic", "chain_sum")
OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}

FLAGS = flags.FlagValues()
flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(__file__), "assets"),
                    "folder of the two .jsonl.gz files", flag_values=FLAGS)
flags.DEFINE_integer("train_seed", 1234, "problem seed of the train split", flag_values=FLAGS)
flags.DEFINE_integer("eval_seed", 987654, "problem seed of the eval split", flag_values=FLAGS)
flags.DEFINE_integer("train_per_task", 1000, "train pairs per task", flag_values=FLAGS)
flags.DEFINE_integer("eval_per_task", 100, "eval pairs per task", flag_values=FLAGS)
flags.DEFINE_integer("max_tokens", 192, "longest rendered prompt + chosen / rejected kept",
                     flag_values=FLAGS)


def _fmt(x: fractions.Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else str(float(x))


def _steps(expression: str, error_step: int | None = None, delta: int = 0):
    """Evaluates an arithmetic expression one binary operation at a time.

    Args:
      expression: e.g. "( 56 + -33 ) - 84".
      error_step: index of the step whose result is made wrong by `delta`
        (later steps use the wrong value), or None for the correct solution.
      delta: the arithmetic error.

    Returns:
      (lines "a op b = c", final value) or None if a division is inexact.
    """
    lines = []

    def ev(node):
        if isinstance(node, ast.Constant):
            return fractions.Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            if isinstance(node.operand, ast.Constant):
                return -ev(node.operand)
            v = ev(node.operand)
            c = -v + (delta if error_step == len(lines) else 0)
            lines.append(f"-({_fmt(v)}) = {_fmt(c)}")
            return c
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Div) and (b == 0 or (a / b).denominator != 1):
                raise ArithmeticError
            c = {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b, ast.Div: a / b if b else 0}[
                type(node.op)
            ]
            if error_step == len(lines):
                c += delta
            lines.append(f"{_fmt(a)} {OPS[type(node.op)]} {_fmt(b)} = {_fmt(c)}")
            return c
        raise ValueError(f"unsupported expression {expression!r}")

    try:
        value = ev(ast.parse(expression.replace("×", "*").replace("÷", "/"), mode="eval").body)
    except ArithmeticError:
        return None
    return lines, value


def _arithmetic_pair(entry, rng):
    correct = _steps(entry["metadata"]["expression"])
    if correct is None or correct[1].denominator != 1:
        return None
    lines, value = correct
    j = rng.randrange(len(lines))
    delta = rng.choice([-10, -2, -1, 1, 2, 10])
    wrong_steps = _steps(entry["metadata"]["expression"], j, delta)
    if wrong_steps is None:  # the error made a later division inexact
        return None
    wrong_lines, wrong = wrong_steps
    head = "Let's compute step by step.\n"
    return (
        head + "\n".join(lines) + f"\nThe answer is {_fmt(value)}.",
        _fmt(value),
        head + "\n".join(wrong_lines) + f"\nThe answer is {_fmt(wrong)}.",
        _fmt(wrong),
    )


def _gsm_pair(entry, rng):
    cot, answer = entry["metadata"]["answer_cot"], str(entry["answer"])
    body = re.sub(r"\n*####.*$", "", cot.strip(), flags=re.S).strip()
    at = body.rfind(answer)
    if at < 0 or "####" in body or not re.fullmatch(r"-?\d+", answer):
        return None
    wrong = str(int(answer) + rng.choice([-10, -2, -1, 1, 2, 10]))
    wrong_body = body[:at] + wrong + body[at + len(answer) :]  # the last step's result is wrong
    return (
        f"{body}\nThe answer is {answer}.",
        answer,
        f"{wrong_body}\nThe answer is {wrong}.",
        wrong,
    )


def build_split(seed: int, per_task: int, tokenizer, max_tokens: int, exclude: set) -> list[dict]:
    """Generates `per_task` verified pairs per task with problem seeds from `seed`.

    Args:
      seed: base seed (task i uses seed + i).
      per_task: pairs per task.
      tokenizer: counts tokens of the rendered conversation (None = no filter).
      max_tokens: longest rendered prompt + chosen / rejected kept (ChatML text,
        including the trailing newline after the last <|im_end|>).
      exclude: questions already used (another split); updated in place.

    Returns:
      Rows in the conversational format with "task" and "answer" fields.
    """
    import reasoning_gym

    rows = []
    for t, task in enumerate(TASKS):
        rng = random.Random(seed * 1000 + t)
        ds = reasoning_gym.create_dataset(task, size=per_task * 4, seed=seed + t)
        made = 0
        for entry in ds:
            if made == per_task:
                break
            q = entry["question"]
            if q in exclude:
                continue
            pair = (_gsm_pair if task == "gsm_symbolic" else _arithmetic_pair)(entry, rng)
            if pair is None:
                continue
            chosen, chosen_answer, rejected, wrong_answer = pair
            if (
                ds.score_answer(chosen_answer, entry) != 1.0
                or ds.score_answer(wrong_answer, entry) >= 1.0
            ):
                continue
            prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
            row = {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "task": task,
                "answer": chosen_answer,
            }
            if (
                tokenizer is not None
                and max(
                    len(
                        tokenizer(
                            tokenizer.apply_chat_template(prompt + row[k], tokenize=False),
                            add_special_tokens=False,
                        )["input_ids"]
                    )
                    for k in ("chosen", "rejected")
                )
                > max_tokens
            ):
                continue
            exclude.add(q)
            rows.append(row)
            made += 1
        if made < per_task:
            raise RuntimeError(
                f"{task}: only {made} of {per_task} pairs within {max_tokens} tokens"
            )
    return rows


def _write(rows: list[dict], path: str) -> None:
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for row in rows:
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m mio_jax.data.build_reasoning_prefs [flags]``; ``argv``: the arguments after
    the program name (default: the command line's)."""
    cli.run(_build, FLAGS, __doc__, argv)


def _build(args: list[str]) -> None:
    """Builds and writes both splits with the parsed flags."""
    cli.expect_no_arguments(args)
    # lazy: the model stack and transformers load only when a set is built
    from mio_jax.models.embedded import smollm2_gguf_path  # lazy: see above
    from mio_jax.models.tokenizer import load_tokenizer  # lazy: see above

    tokenizer = load_tokenizer(smollm2_gguf_path())
    seen: set = set()
    train = build_split(FLAGS.train_seed, FLAGS.train_per_task, tokenizer, FLAGS.max_tokens, seen)
    evals = build_split(FLAGS.eval_seed, FLAGS.eval_per_task, tokenizer, FLAGS.max_tokens, seen)
    assert not {r["prompt"][1]["content"] for r in train} & {
        r["prompt"][1]["content"] for r in evals
    }
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    for name, rows in (("train", train), ("eval", evals)):
        path = os.path.join(FLAGS.out_dir, f"reasoning_prefs_{name}.jsonl.gz")
        _write(rows, path)
        print(f"{path}: {len(rows)} pairs, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
