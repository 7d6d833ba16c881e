"""On-policy preference data: sample K answers per prompt, verify them, keep (correct, incorrect).

    python -m mio_jax.pairs --model=PATH_OR_GGUF --tasks=basic_arithmetic,chain_sum \
        --num_prompts=200 --num_samples=8 --temperature=0.8 --mode=pairs --out=pairs.jsonl.gz
    python -m mio_jax.pairs --config=my_pairs_config.py --num_samples=4   # flags override

`--config` names a Python file whose `get_config()` returns an ml_collections ConfigDict with
any of `default_config()`'s keys. Method.md section 5: negatives (and positives) come from the
model itself, so training sees the model's own mistakes.

Output rows are in the data package's formats (`mio_jax.data.formats`):
  * mode "pairs": conversational rows {"prompt": [system, user], "chosen": [assistant],
    "rejected": [assistant], "task", "answer", "chosen_score", "rejected_score"}.
  * mode "group": K-way rows {"prompt", "completions": [[assistant], ...], "scores", "task",
    "answer"}: the first correct sample, then the distinct incorrect ones (hardest first is
    left to the data package, which sorts negatives by score).
Prompts whose K samples are all correct or all incorrect give no row; they are counted.
Problem seeds must stay below the evaluation range (`mio_jax.heldout.EVAL_SEED_BASE`).
"""

from __future__ import annotations

import gzip
import itertools
import json
import runpy
from typing import Any, Mapping, Sequence

import ml_collections
from absl import flags

from mio_jax import cli, distributed, errors, evaluate, heldout, paths, verifiers
from mio_jax.models import smollm2_gguf_path


def default_config() -> ml_collections.ConfigDict:
    """Every setting of the pairs builder, with its default."""
    c = ml_collections.ConfigDict()
    c.model = ""  # HF folder or .gguf (the CLI's real sampler); "" = embedded SmolLM2-135M
    c.adapter = ""  # a PEFT LoRA folder applied to the model (e.g. a run's peft_adapter/)
    c.tasks = "basic_arithmetic,chain_sum"  # comma-separated reasoning-gym tasks ("" = none)
    c.task_config = ""  # JSON kwargs of every task's reasoning-gym config ("" = its defaults)
    c.jsonl = ""  # or/and a JSONL of {"question", "answer"} rows
    c.num_prompts = 100  # per task (and the first N of the JSONL; 0 = all of it)
    c.seed = 0  # problem seed: items seed .. seed + num_prompts - 1 (below EVAL_SEED_BASE)
    c.sample_seed = 0
    c.num_samples = 8  # K
    c.temperature = 0.8
    c.top_p = 0.95
    c.top_k = 0
    c.max_new_tokens = 256
    c.batch_size = 8  # prompts per sampler call (batch_size * K sequences)
    c.mode = "pairs"  # "pairs", "best_worst", "length_matched" or "group"
    c.pairs_per_prompt = 1  # mode pairs: first N (correct, incorrect) combinations; 0 = all
    c.num_negatives = 0  # mode group: at most N incorrect samples per row; 0 = all distinct
    c.verifier = ""  # "" = reasoning_gym for tasks, exact_number for JSONL; or name / module:fn
    c.system = heldout.DEFAULT_SYSTEM
    c.out = "pairs.jsonl"
    return c


FLAGS = flags.FlagValues()
flags.DEFINE_string("config", "", "Python file whose get_config() sets any of the settings "
                    "below; the flags given override it", flag_values=FLAGS)
cli.define_from_defaults(default_config(), FLAGS, "a setting of default_config() (see the "
                         "comments there)")


def _message(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def rows_for_prompt(prompt: Sequence[Mapping[str, str]], example: Mapping[str, Any],
                    texts: Sequence[str], scores: Sequence[float], *, mode: str,
                    pairs_per_prompt: int = 1, num_negatives: int = 0) -> list[dict[str, Any]]:
    """Preference rows of one prompt from its K scored samples (pure).

    Args:
      prompt: the chat prompt the samples answer.
      example: the example (its `task` and `answer` are copied into the rows).
      texts: the K sample texts.
      scores: their verifier scores; `verifiers.is_correct` splits correct / incorrect.
      mode: "pairs" (conversational rows), "best_worst" (one row: the best-scored correct
        sample against the worst-scored incorrect one, the first of equals),
        "length_matched" (one row: the first correct sample against the incorrect one
        closest to it in length, in characters; the first of equals: so that the pair's
        log-ratios do not just measure length) or "group" (one K-way row).
      pairs_per_prompt: mode pairs, keep the first N distinct (correct, incorrect)
        combinations in sample order; 0 keeps all.
      num_negatives: mode group, keep at most N distinct incorrect samples; 0 keeps all.

    Returns:
      rows ([] when all or none of the samples are correct).
    """
    good = [i for i, s in enumerate(scores) if verifiers.is_correct(s)]
    bad = [i for i, s in enumerate(scores) if not verifiers.is_correct(s)]
    if not good or not bad:
        return []
    meta = {"task": evaluate.task_name(example), "answer": str(example["answer"])}
    if mode in ("best_worst", "length_matched"):
        if mode == "best_worst":
            g = max(good, key=lambda i: (scores[i], -i))
            b = min(bad, key=lambda i: (scores[i], i))
        else:
            g = good[0]
            b = min(bad, key=lambda i: (abs(len(texts[i]) - len(texts[g])), i))
        return [{"prompt": list(prompt), "chosen": _message(texts[g]),
                 "rejected": _message(texts[b]), **meta,
                 "chosen_score": float(scores[g]), "rejected_score": float(scores[b])}]
    if mode == "pairs":
        rows, seen = [], set()
        for g, b in itertools.product(good, bad):
            if (texts[g], texts[b]) in seen:
                continue
            seen.add((texts[g], texts[b]))
            rows.append({"prompt": list(prompt), "chosen": _message(texts[g]),
                         "rejected": _message(texts[b]), **meta,
                         "chosen_score": float(scores[g]), "rejected_score": float(scores[b])})
            if pairs_per_prompt and len(rows) == pairs_per_prompt:
                break
        return rows
    if mode == "group":
        negatives, seen = [], set()
        for b in bad:
            if texts[b] not in seen:
                seen.add(texts[b])
                negatives.append(b)
        if num_negatives:
            negatives = negatives[:num_negatives]
        keep = [good[0]] + negatives
        return [{"prompt": list(prompt), "completions": [_message(texts[i]) for i in keep],
                 "scores": [float(scores[i]) for i in keep], **meta}]
    raise ValueError(f"pairs: mode must be one of {MODES}, got {mode!r}")


MODES = ("pairs", "best_worst", "length_matched", "group")


def build(sampler: evaluate.Sampler, examples: Sequence[Mapping[str, Any]], verifier: str | verifiers.Verifier,
          *, num_samples: int, mode: str, pairs_per_prompt: int = 1, num_negatives: int = 0,
          batch_size: int = 8, system: str = heldout.DEFAULT_SYSTEM, progress: bool = True
          ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Samples `num_samples` answers per example, scores them and builds rows.

    Args:
      sampler: chat prompts -> one completion each (`evaluate.make_sampler`, or any function).
      examples: rows with `question` and `answer` (reasoning-gym rows also `task`, `metadata`).
      verifier: verifier name or callable.
      num_samples: K samples per prompt (>= 2).
      mode, pairs_per_prompt, num_negatives: as in `rows_for_prompt`.
      batch_size: prompts per sampler call.
      system: system prompt ("" for none).
      progress: show a tqdm bar with ETA.

    Returns:
      (rows, stats) with stats {"prompts", "samples", "correct", "incorrect", "all_correct",
      "none_correct", "prompts_with_rows", "rows"}.
    """
    if num_samples < 2:
        raise ValueError(f"pairs: num_samples must be >= 2, got {num_samples}")
    if mode not in MODES:
        raise ValueError(f"pairs: mode must be one of {MODES}, got {mode!r}")
    verify = verifiers.get(verifier) if isinstance(verifier, str) else verifier
    stats = dict(prompts=0, samples=0, correct=0, incorrect=0, all_correct=0, none_correct=0,
                 prompts_with_rows=0, rows=0)
    rows: list[dict[str, Any]] = []
    from tqdm import tqdm

    bar = tqdm(total=len(examples), unit="prompt", disable=not progress, desc="pairs")
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        prompts = [evaluate.prompt_messages(ex, system) for ex in chunk]
        texts = sampler([p for p in prompts for _ in range(num_samples)])
        if len(texts) != len(prompts) * num_samples:
            raise ValueError(f"sampler returned {len(texts)} texts for {len(prompts) * num_samples} prompts")
        for j, (prompt, ex) in enumerate(zip(prompts, chunk)):
            own = texts[j * num_samples:(j + 1) * num_samples]
            scores = [float(verify(t, ex)) for t in own]
            n_good = sum(verifiers.is_correct(s) for s in scores)
            stats["prompts"] += 1
            stats["samples"] += num_samples
            stats["correct"] += n_good
            stats["incorrect"] += num_samples - n_good
            stats["all_correct"] += n_good == num_samples
            stats["none_correct"] += n_good == 0
            new = rows_for_prompt(prompt, ex, own, scores, mode=mode, pairs_per_prompt=pairs_per_prompt,
                                  num_negatives=num_negatives)
            stats["prompts_with_rows"] += bool(new)
            rows.extend(new)
        bar.update(len(chunk))
        bar.set_postfix(rows=len(rows), correct=f"{stats['correct'] / max(stats['samples'], 1):.2f}")
    bar.close()
    stats["rows"] = len(rows)
    return rows, stats


def load_examples(cfg: ml_collections.ConfigDict) -> list[tuple[list[dict[str, Any]], str]]:
    """The configured prompt sources as (examples, verifier name) lists."""
    sources = []
    for task in [t.strip() for t in cfg.tasks.split(",") if t.strip()]:
        heldout.check_training_seeds(cfg.seed, cfg.num_prompts)
        task_config = heldout.parse_task_config(cfg.get("task_config", ""))
        sources.append((heldout.reasoning_gym_examples(task, cfg.num_prompts, cfg.seed, task_config),
                        cfg.verifier or "reasoning_gym"))
    if cfg.jsonl:
        sources.append((evaluate.jsonl_examples(cfg.jsonl, cfg.num_prompts), cfg.verifier or "exact_number"))
    if not sources:
        raise ValueError("pairs: config gives neither tasks nor jsonl")
    return sources


def write_rows(rows: Sequence[Mapping[str, Any]], path: str) -> None:
    """Writes JSON Lines (gzip when `path` ends with .gz), atomically, to a local path or a
    URL such as `gs://bucket/pairs.jsonl.gz`."""
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    paths.write_bytes(path, gzip.compress(data, mtime=0) if path.endswith(".gz") else data)


def run(cfg: ml_collections.ConfigDict, sampler: evaluate.Sampler | None = None,
        progress: bool = True) -> dict[str, Any]:
    """Builds and writes the rows of `cfg`; the stats go to `<out>.stats.json` and are returned.

    Args:
      cfg: a `default_config()`-shaped config.
      sampler: injected sampler; None builds the real one from `cfg.model`.
      progress: tqdm bar.
    """
    if sampler is None:

        sampler = evaluate.make_sampler(cfg.model or smollm2_gguf_path(), max_new_tokens=cfg.max_new_tokens,
                                        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                        batch_size=cfg.batch_size * cfg.num_samples, seed=cfg.sample_seed,
                                        adapter=cfg.adapter)
    rows: list[dict[str, Any]] = []
    total = dict(prompts=0, samples=0, correct=0, incorrect=0, all_correct=0, none_correct=0,
                 prompts_with_rows=0, rows=0)
    for examples, verifier in load_examples(cfg):
        new, stats = build(sampler, examples, verifier, num_samples=cfg.num_samples, mode=cfg.mode,
                           pairs_per_prompt=cfg.pairs_per_prompt, num_negatives=cfg.num_negatives,
                           batch_size=cfg.batch_size, system=cfg.system, progress=progress)
        rows.extend(new)
        total = {k: total[k] + stats[k] for k in total}
    write_rows(rows, cfg.out)
    report = {"config": cfg.to_dict(), "stats": total}
    paths.write_json(cfg.out + ".stats.json", report, indent=1)
    return report


def parse_config(argv: Sequence[str]) -> ml_collections.ConfigDict:
    """The config of a command line (``argv``: the arguments after the program name)."""
    return _config(cli.parse(FLAGS, ["mio_jax.pairs", *argv], doc=__doc__))


def _config(args: list[str]) -> ml_collections.ConfigDict:
    """The config of the parsed flags (``args``: the positional arguments, which must be
    none): the defaults, then ``--config=FILE.py`` (its ``get_config()``), then the flags
    given.

    Raises:
      mio_jax.errors.ConfigError: the file defines no ``get_config()`` or sets an unknown key.
    """
    cli.expect_no_arguments(args)
    cfg = default_config()
    if FLAGS.config:
        loaded = runpy.run_path(FLAGS.config)
        if "get_config" not in loaded:
            raise errors.ConfigError(f"{FLAGS.config}: defines no get_config()")
        for k, v in loaded["get_config"]().items():
            if k not in cfg:
                raise errors.ConfigError(f"{FLAGS.config}: unknown pairs config key {k!r}; "
                                         f"known: {sorted(cfg)}")
            cfg[k] = v
    for k in cfg.keys():
        if FLAGS[k].present:
            cfg[k] = FLAGS[k].value
    return cfg


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m mio_jax.pairs`` (the ``mio-pairs`` command; see the module docstring);
    ``argv``: the arguments after the program name (default: the command line's)."""
    distributed.refuse_multi_process("mio_jax.pairs")
    cli.run(_pairs, FLAGS, __doc__, argv)


def _pairs(args: list[str]) -> None:
    """Builds and writes the rows of the parsed flags' config."""
    with errors.input_errors_in_one_line():  # a bad config file, model, JSONL or verifier
        cfg = _config(args)
        print(cfg)
        report = run(cfg)
    s = report["stats"]
    print(f"{s['prompts']} prompts x {cfg.num_samples} samples: {s['correct']} correct, "
          f"{s['incorrect']} incorrect; all correct {s['all_correct']}, none correct "
          f"{s['none_correct']}; {s['rows']} rows from {s['prompts_with_rows']} prompts -> {cfg.out}")


if __name__ == "__main__":
    main()
