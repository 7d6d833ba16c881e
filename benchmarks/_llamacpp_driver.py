"""llama.cpp side of benchmarks/generate.py; runs with the throwaway llama.cpp env's python
(llama-cpp-python's low-level API), never mio_jax's.

Greedy generation of a batch of prompts the way llama.cpp serves several sequences at
once: one `llama_batch` holding every row's prompt tokens (each row its own sequence id)
for the prefill, then one `llama_batch` of one token per row and one `llama_decode` per
step; the next tokens are the argmax of the returned logits rows. No EOS stops a row, so
every row gets exactly `n_new` tokens, as on the mio_jax side.

With "mode": "rollouts" in SPEC (and num_samples, eos, temperature, top_p) it samples G
continuations of each prompt instead (`rollouts`), timing whole calls; it prints
{"run": {"G", "seconds", "lengths"}}.

Usage: python _llamacpp_driver.py SPEC.json   (SPEC: gguf, prompts [[ids]...], n_new,
batch_sizes, threads, repeats). Prints one JSON object: {"system_info": ..., "runs":
[{"batch": B, "seconds": [..], "prefill_seconds": [..] (until every row's first token),
"tokens": [[ids] per row]}]}.
"""

import json
import sys
import time

import numpy as np


def _context(llama_cpp, model, rows: int, per_row: int, prompt_tokens: int, threads: int,
             unified: bool):
    params = llama_cpp.llama_context_default_params()
    params.n_seq_max = rows
    params.kv_unified = unified
    params.n_ctx = rows * per_row
    params.n_batch = max(512, prompt_tokens)
    params.n_ubatch = 512
    params.n_threads = threads
    params.n_threads_batch = threads
    params.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError(f"llama.cpp could not make a context for {rows} sequences")
    return ctx


def _fill(batch, tokens, positions, seqs, logits):
    for i, (t, p, s, out) in enumerate(zip(tokens, positions, seqs, logits)):
        batch.token[i] = int(t)
        batch.pos[i] = int(p)
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = int(s)
        batch.logits[i] = 1 if out else 0
    batch.n_tokens = len(tokens)


def generate(llama_cpp, ctx, batch, prompts, n_new: int, n_vocab: int):
    """Greedy continuation of each prompt (row r = sequence r): `n_new` tokens each.
    Returns (tokens per row, seconds until the first token of every row)."""
    t0 = time.perf_counter()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    rows = len(prompts)
    toks, pos, seqs, outs = [], [], [], []
    for r, p in enumerate(prompts):
        toks += p
        pos += range(len(p))
        seqs += [r] * len(p)
        outs += [False] * (len(p) - 1) + [True]
    _fill(batch, toks, pos, seqs, outs)
    generated = [[] for _ in range(rows)]
    lengths = [len(p) for p in prompts]
    for step in range(n_new):
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError(f"llama_decode failed at step {step}")
        at = [i for i, out in enumerate(outs) if out]  # batch index of each row's output
        nxt = [int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i),
                                         shape=(n_vocab,)).argmax()) for i in at]
        for r in range(rows):
            generated[r].append(nxt[r])
        if step == 0:
            first = time.perf_counter() - t0
        if step + 1 < n_new:  # the last token needs no forward of its own
            outs = [True] * rows
            _fill(batch, nxt, [lengths[r] + step for r in range(rows)], range(rows), outs)
    return generated, first


def rollouts(llama_cpp, ctx, batch, prompts, g: int, n_new: int, eos, sampler_for):
    """G sampled continuations of each prompt the way llama.cpp's batched example serves
    them: each prompt prefilled once (sequence i * G), its KV cells copied to its other
    G - 1 sequences (`llama_memory_seq_cp`), then one `llama_decode` per step over the rows
    still running (a row that samples an EOS leaves the batch). Sampling is llama.cpp's own
    chain (temperature, top-p, a seeded draw), one chain per row. Returns the tokens of
    every row (prompt-major)."""
    mem = llama_cpp.llama_get_memory(ctx)
    llama_cpp.llama_memory_clear(mem, True)
    toks, pos, seqs, outs = [], [], [], []
    for i, p in enumerate(prompts):
        toks += p
        pos += range(len(p))
        seqs += [i * g] * len(p)
        outs += [False] * (len(p) - 1) + [True]
    _fill(batch, toks, pos, seqs, outs)
    if llama_cpp.llama_decode(ctx, batch) != 0:
        raise RuntimeError("llama_decode failed in the prefill")
    last = [i for i, out in enumerate(outs) if out]  # batch index of prompt i's logits
    rows = len(prompts) * g
    for i in range(len(prompts)):
        for j in range(1, g):
            llama_cpp.llama_memory_seq_cp(mem, i * g, i * g + j, -1, -1)
    samplers = [sampler_for(r) for r in range(rows)]
    generated = [[] for _ in range(rows)]
    index = [last[r // g] for r in range(rows)]  # where each row's logits are
    live = list(range(rows))
    for step in range(n_new):
        nxt = {r: int(llama_cpp.llama_sampler_sample(samplers[r], ctx, index[r])) for r in live}
        for r in live:
            generated[r].append(nxt[r])
        live = [r for r in live if nxt[r] not in eos]
        if not live or step + 1 == n_new:
            break
        _fill(batch, [nxt[r] for r in live],
              [len(prompts[r // g]) + step for r in live], live, [True] * len(live))
        index = {r: b for b, r in enumerate(live)}
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError(f"llama_decode failed at step {step}")
    for s in samplers:
        llama_cpp.llama_sampler_free(s)
    return generated


def rollout_main(llama_cpp, model, spec):
    g, n_new = int(spec["num_samples"]), int(spec["n_new"])
    prompts = spec["prompts"]
    # prompts in waves of batch_rows / G (llama.cpp's batched example serves one wave)
    per = max(int(spec.get("batch_rows") or len(prompts) * g) // g, 1)
    waves = [prompts[i:i + per] for i in range(0, len(prompts), per)]
    rows = len(waves[0]) * g
    per_row = -(-(max(len(p) for p in prompts) + n_new) // 256) * 256
    total = max(sum(len(p) for p in w) for w in waves)
    ctx = _context(llama_cpp, model, rows, per_row, total, int(spec["threads"]), unified=True)
    batch = llama_cpp.llama_batch_init(max(total, rows), 0, 1)
    eos = set(spec["eos"])

    def sampler_for(seed):
        def make(r):
            chain = llama_cpp.llama_sampler_chain_init(
                llama_cpp.llama_sampler_chain_default_params())
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(
                float(spec["top_p"]), 1))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(
                float(spec["temperature"])))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(
                seed * 100003 + r))
            return chain
        return make

    def call(seed):
        out = []
        for w, wave in enumerate(waves):
            make = sampler_for(seed)
            out += rollouts(llama_cpp, ctx, batch, wave, g, n_new, eos,
                            lambda r, w=w: make(w * per * g + r))
        return out

    call(0)  # warm-up
    seconds, tokens = [], []
    for rep in range(int(spec["repeats"])):
        t0 = time.perf_counter()
        out = call(rep + 1)
        seconds.append(time.perf_counter() - t0)
        tokens.append([len(x) for x in out])
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    return {"G": g, "seconds": seconds, "lengths": tokens}


def main():
    spec = json.load(open(sys.argv[1]))
    import llama_cpp

    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(spec["gguf"].encode(),
                                                 llama_cpp.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {spec['gguf']}")
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    if spec.get("mode") == "rollouts":
        run = rollout_main(llama_cpp, model, spec)
        info = llama_cpp.llama_print_system_info()
        llama_cpp.llama_model_free(model)
        print(json.dumps({"system_info": info.decode() if isinstance(info, bytes) else str(info),
                          "version": getattr(llama_cpp, "__version__", "?"), "run": run}))
        return
    n_new = int(spec["n_new"])
    runs = []
    for rows in spec["batch_sizes"]:
        prompts = [spec["prompts"][r % len(spec["prompts"])] for r in range(rows)]
        longest = max(len(p) for p in prompts)
        per_row = -(-(longest + n_new) // 256) * 256
        total = sum(len(p) for p in prompts)
        ctx = _context(llama_cpp, model, rows, per_row, total, int(spec["threads"]),
                       bool(spec.get("kv_unified", False)))
        batch = llama_cpp.llama_batch_init(max(total, rows), 0, 1)
        generate(llama_cpp, ctx, batch, prompts, n_new, n_vocab)  # warm-up
        seconds, prefill, tokens = [], [], None
        for _ in range(int(spec["repeats"])):
            t0 = time.perf_counter()
            tokens, first = generate(llama_cpp, ctx, batch, prompts, n_new, n_vocab)
            seconds.append(time.perf_counter() - t0)
            prefill.append(first)
        runs.append({"batch": rows, "seconds": seconds, "prefill_seconds": prefill,
                     "tokens": tokens})
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        print(f"llama.cpp batch {rows}: {rows * n_new / min(seconds):.1f} tokens/s",
              file=sys.stderr, flush=True)
    info = llama_cpp.llama_print_system_info()
    llama_cpp.llama_model_free(model)
    print(json.dumps({"system_info": info.decode() if isinstance(info, bytes) else str(info),
                      "version": getattr(llama_cpp, "__version__", "?"), "runs": runs}))


if __name__ == "__main__":
    main()
