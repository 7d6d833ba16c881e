"""Pairs per second of the data pipeline on the committed reasoning preference set.

    python benchmarks/data_pipeline.py [--batch_size=8] [--batches=200] [--workers=0,1,2]

Prints: preparation (read + validate + chat template + tokenise) pairs/s, then
batch assembly pairs/s (steady state, after the first batch) for each worker
count and layout (bucketed ``[B, 2, L]``, packed rows, bucketed shared-prompt rows;
``mio_jax.layouts``), and the ratio to a CPU training step of SmolLM2-135M
(about 6 s per step of 2 pairs x 128 tokens on the 2-core machine, measured in
docs/environment; pass --train_pairs_per_s to use another figure).
"""

import argparse
import time

import numpy as np

from mio_jax import data, models


def _rate(it, batches: int, batch_size: int) -> tuple[float, float]:
    """(seconds to the first batch, steady-state pairs/s over `batches` more).

    The steady state starts after 32 batches, past the pipeline's read-ahead
    buffer (16 batches), so it measures production, not a pre-filled buffer.
    """
    t0 = time.perf_counter()
    next(it)
    first = time.perf_counter() - t0
    for _ in range(31):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return first, batches * batch_size / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--train_pairs_per_s", type=float, default=2 / 6.0)
    args = parser.parse_args()
    tokenizer = models.load_tokenizer(models.smollm2_gguf_path())
    config = data.default_data_config()
    config.max_length = args.max_length
    t0 = time.perf_counter()
    prepared = data.prepare(config, tokenizer, split="train")
    prep_s = time.perf_counter() - t0
    n = len(prepared.groups)
    print(prepared.summary.format_text())
    print(f"preparation: {n} pairs in {prep_s:.2f} s = {n / prep_s:.0f} pairs/s (one process)")
    rows = []
    for layout in ("bucketed", "packed", "shared"):
        for workers in [int(w) for w in args.workers.split(",")]:
            c = data.default_data_config()
            c.max_length = args.max_length
            c.packing = layout == "packed"
            c.shared_prompt = layout == "shared"
            c.num_workers = workers
            it = data.make_pipeline(
                c,
                tokenizer,
                batch_size=args.batch_size,
                seed=0,
                prepared=prepared,
                process_index=0,
                process_count=1,
            )
            try:
                first, rate = _rate(it, args.batches, args.batch_size)
            finally:
                it.close()
            rows.append((layout, workers, first, rate))
            print(
                f"assembly {layout:8s} workers={workers}: first batch {first:6.2f} s, "
                f"{rate:8.0f} pairs/s = {rate / args.train_pairs_per_s:,.0f}x the CPU "
                f"training step's {args.train_pairs_per_s:.2f} pairs/s"
            )
    slowest = min(r[3] for r in rows)
    print(
        f"slowest pipeline setting: {slowest:.0f} pairs/s; "
        f"{np.round(slowest / args.train_pairs_per_s):,.0f}x faster than training consumes"
    )


if __name__ == "__main__":
    main()
