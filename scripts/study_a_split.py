"""Study A's pair set split by prompt: every 4th pair (in prompt order; one pair per prompt)
is a probe pair, never trained on; the rest are the training pairs.

    python scripts/study_a_split.py PAIRS.jsonl OUT_DIR
"""

import json
import os
import sys

PROBE_EVERY = 4


def split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(training rows, probe rows) of the pair rows, in their order."""
    probe = [r for i, r in enumerate(rows) if i % PROBE_EVERY == PROBE_EVERY - 1]
    train = [r for i, r in enumerate(rows) if i % PROBE_EVERY != PROBE_EVERY - 1]
    return train, probe


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit(__doc__.strip().splitlines()[-1])
    src, out = argv
    with open(src, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    os.makedirs(out, exist_ok=True)
    for name, part in zip(("train_pairs.jsonl", "probe_pairs.jsonl"), split(rows)):
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
        print(f"{name}: {len(part)} pairs")


if __name__ == "__main__":
    main(sys.argv[1:])
