"""Accuracy of a model on held-out verifiable tasks, with 95% Wilson intervals and pass@k.

    python -m mio_jax.evaluate --model=PATH_OR_GGUF --task=basic_arithmetic --task=chain_sum \
        --num_examples=100 --seed=0 --out=eval.json
    python -m mio_jax.evaluate --model=... --split=test --task=basic_arithmetic \
        --num_examples=1000 --samples=8 --pass_k=4 --temperature=0.8 --out=test_eval.json

Held-out seeds: reasoning-gym item i of a data set created with seed S is drawn from
`Random(S + i)`. Held-out problems come in two splits with disjoint item seeds: "validation"
(S = 10**9 + seed, for choosing hyper-parameters; the trainer's held-out evals use it) and
"test" (S = 1.5 * 10**9 + seed, reported once). Training data and on-policy pairs
(`mio_jax.pairs`) must use item seeds below 10**9 (`heldout.check_training_seeds`; the
splits, task configs and the eval section's checks live in `mio_jax.heldout`). Every evaluation
stores each problem's completions with their verdicts (`completions[i].correct`), which
`mio_jax.compare` pairs across methods and seeds.

The pure core, `evaluate_predictions`, takes completions and examples and returns the metrics,
so a trainer can call it with its own sampler every N steps.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

from absl import flags

from mio_jax import cli, distributed, errors, models, paths, verifiers
from mio_jax.data.sources import iter_jsonl
from mio_jax.heldout import (DEFAULT_SYSTEM, HELD_OUT_SPLITS, heldout_examples,
                             parse_task_config)
from mio_jax.models import lora_decoder

Z95 = 1.959963984540054  # standard normal quantile at 0.975

Messages = list[dict[str, str]]
# A sampler maps chat prompts to one completion text each (the model, or a test's stand-in).
Sampler = Callable[[Sequence[Messages]], list[str]]

FLAGS = flags.FlagValues()
flags.DEFINE_string("model", None, "HF folder or .gguf file (local or gs://...)",
                    flag_values=FLAGS, required=True)
flags.DEFINE_string("adapter", "", "PEFT LoRA folder applied to --model (e.g. a run's "
                    "peft_adapter/)", flag_values=FLAGS)
flags.DEFINE_multi_string("task", [], "reasoning-gym task (repeatable)", flag_values=FLAGS)
flags.DEFINE_string("jsonl", None, "JSONL with question/answer rows instead of (or besides) "
                    "tasks", flag_values=FLAGS)
flags.DEFINE_string("verifier", None, "default: reasoning_gym for tasks, exact_number for "
                    "--jsonl", flag_values=FLAGS)
flags.DEFINE_string("task_config", "", "JSON kwargs of every --task's reasoning-gym config, "
                    "e.g. '{\"max_digits\": 1}'", flag_values=FLAGS)
flags.DEFINE_integer("num_examples", 100, "examples per task (and the first N of --jsonl)",
                     flag_values=FLAGS)
flags.DEFINE_enum("split", "validation", list(HELD_OUT_SPLITS), "held-out split of the "
                  "reasoning-gym problems (disjoint item seeds)", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "eval seed; the split's item seeds start at its base + seed",
                     flag_values=FLAGS)
flags.DEFINE_integer("samples", 1, "completions per example", flag_values=FLAGS)
flags.DEFINE_integer("pass_k", 1, "k of pass@k (<= --samples)", flag_values=FLAGS)
flags.DEFINE_float("temperature", 0.0, "sampling temperature (0: greedy)", flag_values=FLAGS)
flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass", flag_values=FLAGS)
flags.DEFINE_integer("top_k", 0, "top-k sampling (0: off)", flag_values=FLAGS)
flags.DEFINE_string("system", DEFAULT_SYSTEM, "system prompt ('' for none)", flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", 256, "longest completion", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 16, "prompts per generate call", flag_values=FLAGS)
flags.DEFINE_string("out", None, "output JSON file (a local path or gs://...)",
                    flag_values=FLAGS, required=True)


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion.

    Args:
      successes: number of correct examples (0 <= successes <= n).
      n: number of examples (> 0).
      z: normal quantile (1.96 for 95%).

    Returns:
      (low, high) with (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), p = successes/n.
    """
    if n <= 0:
        raise ValueError(f"wilson_interval: n must be positive, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: successes={successes} outside [0, n={n}]")
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, center - half)  # exact ends, not 1 - 1e-16
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k) from c correct of n samples.

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which avoids huge binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def task_name(example: Mapping[str, Any]) -> str:
    """Group key of an example: its reasoning-gym task, else `task`, else "jsonl"."""
    return example.get("task") or (example.get("metadata") or {}).get("source_dataset") or "jsonl"


def evaluate_predictions(
    completions: Sequence[Sequence[str]],
    examples: Sequence[Mapping[str, Any]],
    verifier: str | verifiers.Verifier,
    *,
    pass_k: int = 1,
) -> dict[str, Any]:
    """Scores completions and aggregates per task (pure; no model, no I/O).

    Args:
      completions: per example, its n >= 1 completions (n equal for all; completion 0 is the
        greedy or first sample and defines `accuracy`).
      examples: the examples (dicts with at least `answer`; reasoning-gym rows with `metadata`).
      verifier: a verifier name for `verifiers.get`, or the callable itself.
      pass_k: k of pass@k (<= n).

    Returns:
      {"tasks": {task: {"n", "correct", "accuracy", "ci95": [lo, hi], "pass@k", "pass@k_stderr",
      "samples"}}, "overall": same over all examples}. `accuracy` and its Wilson interval use
      completion 0 (a binomial count); `pass@k` is the mean over examples of the unbiased
      estimator, with the standard error of that mean.
    """
    return aggregate(score(completions, examples, verifier), examples, pass_k=pass_k)


def score(completions: Sequence[Sequence[str]], examples: Sequence[Mapping[str, Any]],
          verifier: str | verifiers.Verifier) -> list[list[bool]]:
    """Each example's verdicts, one per completion (pure). Raises ValueError unless every
    example has the same n >= 1 completions."""
    if len(completions) != len(examples):
        raise ValueError(f"evaluate_predictions: {len(completions)} completion lists for "
                         f"{len(examples)} examples")
    counts = {len(c) for c in completions}
    if len(counts) > 1 or 0 in counts:
        raise ValueError(f"evaluate_predictions: every example needs the same n >= 1 "
                         f"completions, got {counts}")
    verify = verifiers.get(verifier) if isinstance(verifier, str) else verifier
    return [[verifiers.is_correct(verify(text, ex)) for text in comps]
            for comps, ex in zip(completions, examples)]


def aggregate(verdicts: Sequence[Sequence[bool]], examples: Sequence[Mapping[str, Any]], *,
              pass_k: int = 1) -> dict[str, Any]:
    """Per-task and overall metrics of per-example verdicts (see ``evaluate_predictions``)."""
    per_task: dict[str, list[tuple[bool, float]]] = {}
    for correct, ex in zip(verdicts, examples):
        per_task.setdefault(task_name(ex), []).append(
            (correct[0], pass_at_k(len(correct), sum(correct), pass_k)))
    everything = [r for rows in per_task.values() for r in rows]
    n_samples = len(verdicts[0]) if verdicts else 0

    def summary(rows: list[tuple[bool, float]]) -> dict[str, Any]:
        n = len(rows)
        correct = sum(r[0] for r in rows)
        pk = [r[1] for r in rows]
        mean = sum(pk) / n
        var = sum((v - mean) ** 2 for v in pk) / (n - 1) if n > 1 else 0.0
        lo, hi = wilson_interval(correct, n)
        return {"n": n, "correct": correct, "accuracy": correct / n, "ci95": [lo, hi],
                f"pass@{pass_k}": mean, f"pass@{pass_k}_stderr": math.sqrt(var / n),
                "samples": n_samples}

    if not everything:
        raise ValueError("evaluate_predictions: no examples")
    return {"tasks": {t: summary(rows) for t, rows in sorted(per_task.items())},
            "overall": summary(everything)}


def format_table(result: Mapping[str, Any], pass_k: int = 1) -> str:
    """A printable per-task table of an `evaluate_predictions` result."""
    head = f"{'task':<24}{'n':>6}{'correct':>9}{'accuracy':>10}{'95% CI':>18}"
    head += f"{f'pass@{pass_k}':>10}" if pass_k > 1 else ""
    lines = [head]
    for name, r in list(result["tasks"].items()) + [("overall", result["overall"])]:
        ci = "[{:.3f}, {:.3f}]".format(*r["ci95"])
        line = f"{name:<24}{r['n']:>6}{r['correct']:>9}{r['accuracy']:>10.3f}{ci:>18}"
        line += f"{r[f'pass@{pass_k}']:>10.3f}" if pass_k > 1 else ""
        lines.append(line)
    return "\n".join(lines)


def jsonl_examples(path: str, num_examples: int = 0) -> list[dict[str, Any]]:
    """Rows of a JSONL file with `question` and `answer` (first `num_examples` if > 0)."""
    rows = []
    for line_no, row in iter_jsonl(path):
        for key in ("question", "answer"):
            if not isinstance(row, dict) or key not in row:
                raise ValueError(f"{path}:{line_no}: missing key {key!r}")
        rows.append(row)
        if num_examples and len(rows) >= num_examples:
            break
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def prompt_messages(example: Mapping[str, Any], system: str = DEFAULT_SYSTEM) -> Messages:
    """The chat prompt of an example: the system prompt of the training data (asks for a final
    "The answer is N." line) and the question as the user message."""
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": str(example["question"])}]


def make_sampler(model_path: str, *, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, batch_size: int = 16, seed: int = 0,
                 dtype: str = "float32", adapter: str = "") -> Sampler:
    """The real sampler: chat prompts -> completions with `mio_jax.models.generate`.

    Loads the model and tokenizer once; `generate` applies the chat template and batches by
    `batch_size`. Each call advances the seed, so calling again gives fresh samples.
    `adapter`: a PEFT LoRA folder (e.g. a run's `peft_adapter/`) applied to the model.
    """
    model = (lora_decoder.load_with_adapter(model_path, adapter, dtype=dtype) if adapter
             else models.load_pretrained(model_path, dtype=dtype))
    tokenizer = models.load_tokenizer(model_path)
    state = {"seed": seed}

    def sample(prompts: Sequence[Messages]) -> list[str]:
        out = models.generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, top_k=top_k,
                              seed=state["seed"], batch_size=batch_size)
        state["seed"] += 1
        return list(out.texts)

    return sample


def evaluate(sampler: Sampler, examples: Sequence[Mapping[str, Any]], verifier: str | verifiers.Verifier,
             *, samples: int = 1, pass_k: int = 1, system: str = DEFAULT_SYSTEM) -> dict[str, Any]:
    """Samples `samples` completions per example with `sampler` and scores them.

    Returns:
      `evaluate_predictions`'s result plus "completions": per example its task, question,
      answer, completion texts and their verdicts ("correct"; the per-problem outcomes that
      `mio_jax.compare` reads).
    """
    prompts = [prompt_messages(ex, system) for ex in examples for _ in range(samples)]
    texts = sampler(prompts)
    if len(texts) != len(prompts):
        raise ValueError(f"sampler returned {len(texts)} completions for {len(prompts)} prompts")
    grouped = [texts[i * samples:(i + 1) * samples] for i in range(len(examples))]
    verdicts = score(grouped, examples, verifier)
    result = aggregate(verdicts, examples, pass_k=pass_k)
    result["completions"] = [{"task": task_name(ex), "question": ex["question"],
                              "answer": ex["answer"], "completions": g, "correct": v}
                             for ex, g, v in zip(examples, grouped, verdicts)]
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m mio_jax.evaluate`` (the ``mio-evaluate`` command; see the module
    docstring); ``argv``: the arguments after the program name (default: the command
    line's)."""
    distributed.refuse_multi_process("mio_jax.evaluate")
    cli.run(_evaluate, FLAGS, __doc__, argv)


def _evaluate(args: list[str]) -> None:
    """Checks the parsed flags against each other, then evaluates."""
    cli.expect_no_arguments(args)
    if not FLAGS.task and not FLAGS.jsonl:
        errors.fail("give --task and/or --jsonl")
    if FLAGS.pass_k > FLAGS.samples:
        errors.fail(f"--pass_k={FLAGS.pass_k} needs --samples >= pass_k")
    if FLAGS.samples > 1 and FLAGS.temperature == 0.0:
        errors.fail("--samples > 1 needs --temperature > 0 (greedy samples are identical)")
    with errors.input_errors_in_one_line():  # a missing model, adapter or JSONL: one line
        _run(FLAGS)


def _run(args: flags.FlagValues) -> None:
    """Evaluates and writes the report of the parsed flags ``args``."""
    sampler = make_sampler(args.model, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_p=args.top_p, top_k=args.top_k, batch_size=args.batch_size, seed=args.seed,
                           adapter=args.adapter)
    report: dict[str, Any] = {"args": args.flag_values_dict(), "split": args.split,
                              "eval_seed_base": HELD_OUT_SPLITS[args.split],
                              "results": {}}
    task_config = parse_task_config(args.task_config)
    sources = [(t, heldout_examples(t, args.num_examples, args.seed, task_config, args.split),
                args.verifier or "reasoning_gym")
               for t in args.task]
    if args.jsonl:
        sources.append(("jsonl", jsonl_examples(args.jsonl, args.num_examples),
                        args.verifier or "exact_number"))
    for name, examples, verifier in sources:
        result = evaluate(sampler, examples, verifier, samples=args.samples, pass_k=args.pass_k,
                          system=args.system)
        report["results"][name] = result
        print(format_table(result, args.pass_k))
    paths.write_json(args.out, report, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
