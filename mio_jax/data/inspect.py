"""Shows what the model will train on: counts, lengths, truncation, rendered examples.

    python -m mio_jax.data.inspect --config=configs/default.py [--split=train]
        [--examples=3] [--batch_size=8] [--tokenizer=PATH]
    python -m mio_jax.data.inspect --config=configs/default.py --config.data.max_length=128

`--config` is a training config (its `data` and `model` sections are used) or a
file whose get_config() returns a data config (then pass --tokenizer). In the
rendered examples the tokens whose log-probs count (the loss mask) are shown
between ⟦ and ⟧.
"""

import numpy as np
from absl import flags
from ml_collections import config_flags

from mio_jax import cli, errors
from mio_jax.data import batching, pipeline
from mio_jax.models.embedded import smollm2_gguf_path
from mio_jax.models.tokenizer import load_tokenizer

MARK_OPEN, MARK_CLOSE = "⟦", "⟧"

FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file("config", None, "training or data config file",
                                flag_values=FLAGS)
flags.DEFINE_enum("split", "train", ["train", "eval"], "split to inspect", flag_values=FLAGS)
flags.DEFINE_integer("examples", 3, "rendered examples", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 8, "batch size for the padding figure", flag_values=FLAGS)
flags.DEFINE_string("tokenizer", "", "tokenizer path (default: config.model)", flag_values=FLAGS)
flags.mark_flag_as_required("config", flag_values=FLAGS)


def histogram(values: np.ndarray, *, bins: int = 8, width: int = 40, title: str = "") -> str:
    """A text histogram of integer values.

    Args:
      values: [N] numbers.
      bins: number of equal-width bins.
      width: characters of the longest bar.
      title: first line.

    Returns:
      Lines "lo-hi | ##### count", preceded by the title with min/mean/max.
    """
    values = np.asarray(values)
    lines = [f"{title}: min {values.min()} mean {values.mean():.1f} max {values.max()}"]
    counts, edges = np.histogram(values, bins=bins)
    top = max(counts.max(), 1)
    for c, lo, hi in zip(counts, edges[:-1], edges[1:]):
        lines.append(
            f"  {int(lo):5d}-{int(hi):<5d} | {'#' * int(round(width * c / top)):<{width}} {c}"
        )
    return "\n".join(lines)


def render_sequence(
    tokenizer, input_ids_l: np.ndarray, loss_mask_l: np.ndarray, attention_mask_l: np.ndarray
) -> str:
    """Decodes one sequence, wrapping the tokens that are loss targets in ⟦ ⟧.

    Token j is a target when loss_mask[j - 1] == 1 (targets[t] = input_ids[t + 1]).

    Args:
      tokenizer: the tokenizer used to build the batch.
      input_ids_l, loss_mask_l, attention_mask_l: [L] rows of a PreferenceBatch.

    Returns:
      The decoded text with special tokens kept.
    """
    n = int(attention_mask_l.sum())
    ids = input_ids_l[:n].tolist()
    trained = [False] + [bool(m) for m in loss_mask_l[: n - 1]]
    out, start = [], 0
    for j in range(1, n + 1):
        if j == n or trained[j] != trained[start]:
            text = tokenizer.decode(ids[start:j], skip_special_tokens=False)
            out.append(f"{MARK_OPEN}{text}{MARK_CLOSE}" if trained[start] else text)
            start = j
    return "".join(out)


def report_text(
    prepared: pipeline.PreparedSplit,
    tokenizer,
    data_config,
    *,
    examples: int = 3,
    batch_size: int = 8,
) -> str:
    """The whole inspection report of one prepared split, as text.

    Args:
      prepared: the prepared split.
      tokenizer: its tokenizer.
      data_config: the data config (padding / bucketing settings).
      examples: rendered examples to show.
      batch_size: batch size used for the padding-efficiency figure.

    Returns:
      Multi-line text: summary, histograms, padding efficiency, examples.
    """
    s = prepared.summary
    groups = prepared.groups
    prompt = np.array([len(g.prompt_ids) for g in groups])
    completion = np.array([len(c) for g in groups for c in g.completion_ids])
    seq = np.array([n for g in groups for n in g.seq_lengths])
    parts = [
        s.format_text(),
        f"  truncated: prompt {s.prompt_truncated / s.groups:.1%} of groups, "
        f"completion {s.completion_truncated / s.groups:.1%} of groups "
        f"(max_length={data_config.max_length}, max_prompt_length="
        f"{data_config.max_prompt_length}, mode={data_config.truncation_mode})",
        histogram(prompt, title="prompt tokens"),
        histogram(completion, title="completion tokens (every slot)"),
        histogram(seq, title="sequence tokens (prompt + completion)"),
    ]
    bs = min(batch_size, len(groups))
    it = pipeline.make_pipeline(
        data_config,
        tokenizer,
        split="eval",
        batch_size=bs,
        prepared=prepared,
        process_index=0,
        process_count=1,
    )
    real = padded = 0
    first = None
    for batch in it:
        first = first or batch
        real += int(batch.attention_mask.sum())
        padded += int(batch.attention_mask.size)
    layout = (
        "packed"
        if data_config.packing
        else ("bucketed" if data_config.bucketing else "padded to max_length")
    )
    parts.append(f"padding efficiency ({layout}, batch {bs}): {real / padded:.1%} real tokens")
    ids = np.arange(min(examples, len(groups)))
    if not len(ids):
        return "\n".join(parts)
    shown = batching.collate(
        [groups[i] for i in ids],
        ids,
        K=prepared.K,
        L=int(max(max(groups[i].seq_lengths) for i in ids)),
        pad_id=data_config.pad_id,
    )
    for b, i in enumerate(ids):
        parts.append(
            f"--- example {i} ({groups[i].row_id}); {MARK_OPEN}...{MARK_CLOSE} = tokens in the loss"
        )
        for k in range(prepared.K):
            if shown.valid[b, k]:
                name = ("chosen", "rejected")[k] if prepared.K == 2 else f"slot {k}"
                parts.append(
                    f"[{name}] {int(shown.loss_mask[b, k].sum())} loss tokens\n"
                    + render_sequence(
                        tokenizer,
                        shown.input_ids[b, k],
                        shown.loss_mask[b, k],
                        shown.attention_mask[b, k],
                    )
                )
    return "\n".join(parts)


def load_tokenizer_for(config, override: str = ""):
    """Tokenizer from --tokenizer, else the training config's model section."""
    path = override
    if not path and "model" in config:
        path = config.model.get("tokenizer_path", "") or config.model.path
    if not path:
        raise ValueError("no tokenizer: pass --tokenizer=PATH (HF folder, .gguf or 'smollm2')")
    if path == "smollm2":

        path = smollm2_gguf_path()
    return load_tokenizer(path)


def main(argv):
    """Prepares the chosen split and prints the report."""
    del argv
    config = FLAGS.config
    data_config = config.data if "data" in config else config
    with errors.input_errors_in_one_line():  # a bad row or a missing file: one line, exit 2
        tokenizer = load_tokenizer_for(config, FLAGS.tokenizer)
        prepared = pipeline.prepare(data_config, tokenizer, split=FLAGS.split)
    print(
        report_text(
            prepared,
            tokenizer,
            data_config,
            examples=FLAGS.examples,
            batch_size=FLAGS.batch_size,
        )
    )


def run() -> None:
    """The ``mio-inspect-data`` command: ``python -m mio_jax.data.inspect``'s flags."""
    cli.run(main, FLAGS, __doc__)


if __name__ == "__main__":
    run()
