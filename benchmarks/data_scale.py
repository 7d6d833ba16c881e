"""The tokenized cache at scale: build, restart, memory and batch throughput on N processes.

    python benchmarks/data_scale.py [--pairs=1000000] [--processes=1,2,4] \\
        [--baseline_processes=1,max] [--sizes=20000,100000] [--out_dir=/tmp/mio_data_scale]
    python benchmarks/data_scale.py --pairs=20000            # a quick run

1. Generates (once, kept in ``--out_dir``) ``--pairs`` explicit pairs ``{"prompt", "chosen",
   "rejected"}`` as JSONL: plain words of a fixed vocabulary with sentence ends and small
   numbers, log-normal lengths (prompt median ~60 words, chosen ~120, rejected ~110, long
   tails capped; a word is ~1.3 SmolLM2 tokens), fixed seed.
2. For each N in ``--processes``, N JAX processes on this machine (``mio_jax.local_pod``, one
   CPU device each, ``jax.distributed`` initialised for N > 1), each running this script in
   ``--child`` mode:
     first start: ``prepare(..., cache_dir=<fresh folder for this N>)`` builds the cache
       (process p tokenises rows n % N == p; collective), then the first batch;
     restart: a fresh pod on the built cache: time to the first batch of
       ``make_pipeline(...).next_with_info()`` measured from just before the pod is
       launched (interpreter, imports, jax.distributed, tokenizer, cache check and index
       load, pipeline) and in-process (from the child's main() before its imports), then
       the batch rate over ``--batches`` batches after ``--skip`` (past grain's read-ahead;
       the N processes start timing together);
     no cache ("today's"), for N in ``--baseline_processes``: every process tokenises the
       whole split in memory (``cache_dir=None``), time to first batch, the same rate.
   The data config is the default but for ``max_length`` (bucketing on, format detected).
   Peak RSS (``ru_maxrss``) of every process comes back in one JSON file per process.
3. Prints the core count, a table per N (build time, restart / no-cache time to first
   batch, peak RSS per process, global batch rate against the train step's consumption,
   build_1 / build_N and no-cache / restart) and the restart's phases; with ``--sizes`` the
   restart memory at several data set sizes (its growth against the lengths index's).
   Everything also goes to ``<out_dir>/data_scale_<pairs>.json``.

The global batch rate is the slowest process's rate of its own share (each process builds
B/N groups of every global batch; all N run at once and share this machine's cores). The
train step consumes one global batch per step: ``--step_seconds`` (default: B /
``--step_pairs_per_s``, SmolLM2-135M on one H100 at 8 x 1024, 131.7 pairs/s,
docs/benchmarks section 5a; the 2-core CPU step is about 0.77 pairs/s at 8 x 256, section 2).
The restart reads part files that were just written (warm page cache).
"""

from __future__ import annotations

import time

T_MAIN = time.time()  # the child's "main() start": before any heavy import

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1024 * 1024

# ---------------------------------------------------------------- the data set

_WORDS = """the of and to in a is that for it as was with be by on not he this are or his
from at which but have an they you were her she there been one all we their has would when
if so no will more can who what its out up said about other into than then them these
some could time only new may very first any like people now my over such our man me even
most made after also did many before must through back years where much your way well
down should because each just those how too good state world still own see men work long
get here between both life being under never day same another know while last might us
great old year off come since against go came right used take three place small found
house water part number system program question answer problem example result value
order point group case data model train step batch token memory process cache file read
write build start first second third next simple clear small large fast slow true false
method reason rule table line word text list set key test run check show give make find
think tell ask need seem feel try leave call keep let begin help talk turn move play live
believe hold bring happen write provide sit stand lose pay meet include continue learn
change lead understand watch follow stop create speak read allow add spend grow open walk
win offer remember love consider appear buy wait serve die send expect stay fall cut
reach kill remain suggest raise pass sell require report decide pull""".split()
_NUMBERS = [str(i) for i in range(100)] + ["128", "256", "512", "1024", "2024", "3.5", "0.1"]


def _vocab() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(words, words with a full stop, probabilities), fixed: Zipf-like over the words in
    their listed order, 5 % numbers."""
    words = list(dict.fromkeys(_WORDS))
    vocab = words + _NUMBERS
    assert all(w.isascii() and '"' not in w and "\\" not in w for w in vocab)
    p_words = 1.0 / (np.arange(len(words), dtype=np.float64) + 10.0)
    p = np.concatenate([0.95 * p_words / p_words.sum(),
                        np.full(len(_NUMBERS), 0.05 / len(_NUMBERS))])
    return (np.array(vocab, dtype=object), np.array([w + "." for w in vocab], dtype=object),
            p / p.sum())


def _lengths(rng, n: int, median: float, sigma: float, lo: int, hi: int) -> np.ndarray:
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), lo, hi).astype(np.int64)


def _texts(rng, lengths: np.ndarray, vocab, end: str) -> list[str]:
    words, dotted, p = vocab
    total = int(lengths.sum())
    idx = rng.choice(len(words), size=total, p=p)
    stop = rng.random(total) < 0.07
    ends = np.cumsum(lengths)
    stop[ends - 1] = False  # the text's own end follows
    flat = np.where(stop, dotted[idx], words[idx]).tolist()
    starts = ends - lengths
    return [" ".join(flat[a:b]) + end for a, b in zip(starts.tolist(), ends.tolist())]


def generate(path: str, pairs: int, seed: int = 0, chunk: int = 20000) -> dict:
    """Writes ``pairs`` explicit pairs to ``path`` (JSONL) unless a complete file with the
    same settings is there; returns its description (rows, bytes, word counts, seconds)."""
    meta_path = path + ".meta.json"
    meta = {"pairs": pairs, "seed": seed, "version": 2}
    if os.path.exists(path) and os.path.exists(meta_path):
        with open(meta_path) as f:
            done = json.load(f)
        if {k: done.get(k) for k in meta} == meta and os.path.getsize(path) == done["bytes"]:
            return {**done, "reused": True}
    vocab = _vocab()
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    words = np.zeros(3, np.int64)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="ascii") as f:
        for start in range(0, pairs, chunk):
            n = min(chunk, pairs - start)
            lens = [_lengths(rng, n, 60, 0.6, 4, 700), _lengths(rng, n, 120, 0.7, 2, 1400),
                    _lengths(rng, n, 110, 0.7, 2, 1400)]
            words += [int(x.sum()) for x in lens]
            prompt, chosen, rejected = (_texts(rng, x, vocab, e) for x, e in zip(lens, "?.."))
            f.write("".join(
                f'{{"prompt": "{p}", "chosen": " {c}", "rejected": " {r}"}}\n'
                for p, c, r in zip(prompt, chosen, rejected)))
    os.replace(tmp, path)
    meta.update(bytes=os.path.getsize(path), seconds=time.perf_counter() - t0,
                mean_words={k: float(w) / pairs for k, w in
                            zip(("prompt", "chosen", "rejected"), words)})
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    return {**meta, "reused": False}


# ---------------------------------------------------------------- child processes

def _status_mib(*keys) -> dict:
    """Current VmRSS / RssAnon / RssFile of this process, MiB (Linux)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    out[k] = int(v.split()[0]) / 1024
    except OSError:
        pass
    return out


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _index_bytes(groups) -> int:
    """Bytes of the per-group arrays the store keeps in memory (the lengths index, plus
    the part / position columns of an ``ArrowStore``)."""
    names = ("prompt_lengths", "completion_lengths", "part", "pos")
    return int(sum(getattr(groups, n).nbytes for n in names if hasattr(groups, n)))


def _files(folder) -> dict:
    """{path: (size, mtime_ns)} of the files under a folder ({} for None / none)."""
    out = {}
    for root, _, names in os.walk(folder) if folder else ():
        for name in names:
            st = os.stat(os.path.join(root, name))
            out[os.path.join(root, name)] = (st.st_size, st.st_mtime_ns)
    return out


def child(a) -> None:
    """One process of a pod: prepare (build / cache hit / in memory), first batch, rate."""
    marks = {"main": T_MAIN}
    n_proc = int(os.environ.get("JAX_NUM_PROCESSES", "1"))
    index = int(os.environ.get("JAX_PROCESS_ID", "0"))
    import jax

    from mio_jax import data, distributed, models

    marks["imports"] = time.time()
    if n_proc > 1:
        distributed.initialize()
    assert jax.process_count() == n_proc and jax.process_index() == index
    marks["distributed"] = time.time()
    tokenizer = models.load_tokenizer(models.smollm2_gguf_path())
    marks["tokenizer"] = time.time()
    config = data.default_data_config()
    config.max_length = a.max_length
    config.bucketing = True
    cache_dir = None if a.child == "nocache" else a.cache_dir
    files_before = _files(cache_dir)
    t0 = time.perf_counter()
    prepared = data.prepare(config, tokenizer, split="train", source=a.source,
                            cache_dir=cache_dir)
    prepare_s = time.perf_counter() - t0
    marks["prepared"] = time.time()
    # A restart must find the cache as the build left it (no file written or replaced).
    cache_hit = bool(files_before) and _files(cache_dir) == files_before
    peak_prepared, status_prepared = _peak_mib(), _status_mib("VmRSS", "RssAnon", "RssFile")
    it = data.make_pipeline(config, tokenizer, split="train", batch_size=a.batch_size, seed=0,
                            prepared=prepared, process_index=index, process_count=n_proc)
    batch, info = it.next_with_info()
    marks["first_batch"] = time.time()
    first = {"peak_rss_mib": _peak_mib(), **_status_mib("VmRSS", "RssAnon", "RssFile"),
             "shape": list(np.shape(batch.loss_mask)), "seq_len": int(info.seq_len)}
    rate = None
    if a.batches > 0 and a.child != "build":
        for _ in range(a.skip):
            it.next_with_info()
        if n_proc > 1:  # every process times its share at the same time, as in training
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("data_scale rate")
        t0 = time.perf_counter()
        local_pairs = 0
        for _ in range(a.batches):
            b, _ = it.next_with_info()
            local_pairs += int(np.shape(b.loss_mask)[0])
        dt = time.perf_counter() - t0
        rate = {"batches": a.batches, "seconds": dt, "local_batches_per_s": a.batches / dt,
                "local_pairs_per_s": local_pairs / dt}
    it.close()
    out = {
        "mode": a.child, "process_index": index, "process_count": n_proc, "pid": os.getpid(),
        "marks": marks, "prepare_s": prepare_s, "groups": len(prepared.groups),
        "K": prepared.K, "cache_path": prepared.cache_path, "cache_hit": cache_hit,
        "index_bytes": _index_bytes(prepared.groups),
        "rows_read": prepared.summary.rows_read,
        "prompt_truncated": prepared.summary.prompt_truncated,
        "completion_truncated": prepared.summary.completion_truncated,
        "sequence_tokens": prepared.summary.sequence_tokens,
        "after_prepare": {"peak_rss_mib": peak_prepared, **status_prepared},
        "first_batch": first, "rate": rate,
        "end": {"peak_rss_mib": _peak_mib(), **_status_mib("VmRSS", "RssAnon", "RssFile")},
    }
    os.makedirs(a.result_dir, exist_ok=True)
    path = os.path.join(a.result_dir, f"process_{index}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------- the parent

def _child_env() -> dict:
    env = dict(os.environ)
    pythonpath = env.get("PYTHONPATH", "")
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=REPO + (os.pathsep + pythonpath if pythonpath else ""))
    return env


def run_pod(a, mode: str, n: int, source: str, cache_dir: str, tag: str) -> dict:
    """Runs one pod of ``n`` children in ``mode``; returns the per-process reports and the
    figures the tables use."""
    from mio_jax import local_pod

    result_dir = os.path.join(a.out_dir, "runs", tag)
    shutil.rmtree(result_dir, ignore_errors=True)
    os.makedirs(result_dir)
    argv = [sys.executable, os.path.abspath(__file__), f"--child={mode}", f"--source={source}",
            f"--cache_dir={cache_dir}", f"--result_dir={result_dir}",
            f"--batch_size={a.batch_size}", f"--max_length={a.max_length}",
            f"--batches={a.batches}", f"--skip={a.skip}"]
    print(f"  {tag}: {n} process(es), {mode} ...", end="", flush=True)
    t_launch = time.time()
    pod = local_pod.LocalPod(argv, num_processes=n, devices_per_process=1, env=_child_env(),
                             cwd=REPO, log_dir=os.path.join(result_dir, "logs"))
    pod.wait(a.timeout)
    wall = time.time() - t_launch
    procs = []
    for i in range(n):
        with open(os.path.join(result_dir, f"process_{i}.json")) as f:
            procs.append(json.load(f))
    m = [p["marks"] for p in procs]
    rates = [p["rate"] for p in procs if p["rate"]]
    out = {
        "mode": mode, "processes": n, "pod_wall_s": wall,
        "prepare_s": max(p["prepare_s"] for p in procs),
        "first_batch_wall_s": max(x["first_batch"] for x in m) - t_launch,
        "first_batch_in_process_s": max(x["first_batch"] - x["main"] for x in m),
        "phases_s": {k: max(x[k] - x[prev] for x in m) for prev, k in
                     zip(("main", "imports", "distributed", "tokenizer", "prepared"),
                         ("imports", "distributed", "tokenizer", "prepared", "first_batch"))},
        "interpreter_start_s": max(x["main"] for x in m) - t_launch,
        "peak_rss_mib": max(p["end"]["peak_rss_mib"] for p in procs),
        "peak_rss_first_batch_mib": max(p["first_batch"]["peak_rss_mib"] for p in procs),
        "rss_anon_first_batch_mib": max(p["first_batch"].get("RssAnon", 0) for p in procs),
        "rss_file_first_batch_mib": max(p["first_batch"].get("RssFile", 0) for p in procs),
        "rss_anon_end_mib": max(p["end"].get("RssAnon", 0) for p in procs),
        "groups": procs[0]["groups"], "index_bytes": procs[0]["index_bytes"],
        "per_process": procs,
    }
    if mode == "restart" and not all(p["cache_hit"] for p in procs):
        raise RuntimeError(f"{tag}: the restart did not find the cache as built (files "
                           f"changed under {cache_dir}); see {result_dir}/logs")
    if rates:
        out["global_batches_per_s"] = min(r["local_batches_per_s"] for r in rates)
        out["global_pairs_per_s"] = out["global_batches_per_s"] * a.batch_size
    print(f" {wall:.1f} s", flush=True)
    return out


def _ratio(x, y):
    return x / y if x and y else float("nan")


def _fmt(x, spec=".3g"):
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parent(a) -> dict:
    procs = _ints(a.processes)
    if a.baseline_processes == "all":
        base = procs
    else:
        base = sorted({max(procs) if x == "max" else int(x)
                       for x in a.baseline_processes.split(",") if x.strip() and procs})
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    step_s = a.step_seconds or a.batch_size / a.step_pairs_per_s
    print(f"machine: {cpus} usable cores (os.cpu_count() {os.cpu_count()}); processes "
          f"{procs} of 1 CPU device each; note N processes share these {cpus} cores")
    print(f"settings: pairs={a.pairs}, global batch {a.batch_size}, max_length "
          f"{a.max_length}, bucketing on; rate over {a.batches} batches after {a.skip}; "
          f"train step {step_s:.4g} s per global batch"
          + ("" if a.step_seconds else f" (= {a.batch_size} / {a.step_pairs_per_s} pairs/s)"))
    results = {"cpus": cpus, "args": vars(a), "step_seconds": step_s, "main": [], "sizes": []}
    os.makedirs(a.out_dir, exist_ok=True)

    def dataset(pairs):
        path = os.path.join(a.out_dir, f"pairs_{pairs}_seed{a.seed}.jsonl")
        meta = generate(path, pairs, seed=a.seed)
        print(f"data set: {path} ({meta['bytes'] / MIB:.0f} MiB, "
              + ("reused" if meta["reused"] else f"generated in {meta['seconds']:.1f} s")
              + ", mean words prompt/chosen/rejected "
              + "/".join(f"{v:.0f}" for v in meta["mean_words"].values()) + ")", flush=True)
        return path, meta

    rows = []
    if procs:
        source, meta = dataset(a.pairs)
        results["dataset"] = {"path": source, **meta}
        for n in procs:
            cache_dir = os.path.join(a.out_dir, "cache", f"pairs{a.pairs}_n{n}")
            shutil.rmtree(cache_dir, ignore_errors=True)
            r = {"N": n,
                 "build": run_pod(a, "build", n, source, cache_dir, f"{a.pairs}_n{n}_build"),
                 "restart": run_pod(a, "restart", n, source, cache_dir,
                                    f"{a.pairs}_n{n}_restart")}
            if n in base:
                r["nocache"] = run_pod(a, "nocache", n, source, "", f"{a.pairs}_n{n}_nocache")
            rows.append(r)
            results["main"] = rows
            _save(a, results)
        _print_main(rows, a, step_s, cpus)

    sizes = _ints(a.sizes)
    if sizes:
        n = a.sizes_processes or (max(procs) if procs else 1)
        print(f"\nrestart memory against the data set size ({n} process(es)):")
        for pairs in sizes:
            done = next((r for r in rows if pairs == a.pairs and r["N"] == n), None)
            if done:  # the main table's runs are this size's
                print(f"{pairs} pairs on {n} process(es): the runs above")
                results["sizes"].append({"pairs": pairs, "N": n, "dataset": results["dataset"],
                                         "build": done["build"], "restart": done["restart"]})
                continue
            source, meta = dataset(pairs)
            cache_dir = os.path.join(a.out_dir, "cache", f"sizes_pairs{pairs}_n{n}")
            shutil.rmtree(cache_dir, ignore_errors=True)
            build = run_pod(a, "build", n, source, cache_dir, f"sizes_{pairs}_n{n}_build")
            restart = run_pod(a, "restart", n, source, cache_dir, f"sizes_{pairs}_n{n}_restart")
            results["sizes"].append({"pairs": pairs, "N": n, "dataset": meta, "build": build,
                                     "restart": restart})
            _save(a, results)
        _print_sizes(results["sizes"])
    path = _save(a, results)
    print(f"\nfigures: {path}")
    return results


def _save(a, results) -> str:
    name = (f"data_scale_{a.pairs}" if _ints(a.processes) else "data_scale") + (
        "_sizes_" + "_".join(str(x) for x in _ints(a.sizes)) if _ints(a.sizes) else "")
    path = os.path.join(a.out_dir, name + ".json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(path + ".tmp", path)
    return path


def _print_main(rows, a, step_s, cpus) -> None:
    def table(header, lines):
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for line in lines:
            print("| " + " | ".join(line) + " |")

    b1 = next((r["build"]["prepare_s"] for r in rows if r["N"] == 1), None)
    g = rows[0]["restart"]
    print(f"\n{a.pairs} pairs -> {g['groups']} groups (lengths index in memory "
          f"{g['index_bytes'] / MIB:.1f} MiB per process); {cpus} cores")
    print("times in s, peak RSS (ru_maxrss) per process in MiB (largest of the N), rates: "
          "the slowest process's share, as global batches/s and pairs/s")
    lines = []
    for r in rows:
        bd, rs, nc = r["build"], r["restart"], r.get("nocache")
        lines.append([
            str(r["N"]), _fmt(bd["prepare_s"], ".1f"), _fmt(bd["first_batch_wall_s"], ".1f"),
            _fmt(rs["first_batch_wall_s"], ".2f"), _fmt(rs["first_batch_in_process_s"], ".2f"),
            _fmt(nc and nc["first_batch_wall_s"], ".1f"),
            " / ".join(_fmt(x and x["peak_rss_mib"], ".0f") for x in (bd, rs, nc)),
            _fmt(rs.get("global_batches_per_s"), ".1f"), _fmt(rs.get("global_pairs_per_s"), ".0f"),
            _fmt(_ratio(rs.get("global_batches_per_s"), 1 / step_s), ".1f") + "x",
            _fmt(nc and nc.get("global_pairs_per_s"), ".0f"),
            _fmt(_ratio(b1, bd["prepare_s"]), ".2f"),
            _fmt(nc and _ratio(nc["first_batch_wall_s"], rs["first_batch_wall_s"]), ".1f")])
    table(["N", "build (1st start prepare)", "1st start to 1st batch", "restart to 1st batch",
           "restart in-process", "no-cache to 1st batch", "peak RSS build / restart / no-cache",
           "batches/s (restart)", "pairs/s (restart)", "vs step", "pairs/s (no-cache)",
           "build_1 / build_N", "no-cache / restart"], lines)
    print("\nrestart to first batch, by phase (s, slowest process): interpreter start | "
          "imports | jax.distributed | tokenizer | prepare (cache check + index) | pipeline + "
          "first batch; RSS at the first batch (MiB): peak | anonymous | file-backed (mapped)")
    lines = []
    for r in rows:
        for kind in ("restart", "nocache"):
            x = r.get(kind)
            if not x:
                continue
            ph = x["phases_s"]
            lines.append([str(r["N"]), kind, _fmt(x["interpreter_start_s"], ".2f")]
                         + [_fmt(ph[k], ".2f") for k in ("imports", "distributed", "tokenizer",
                                                         "prepared", "first_batch")]
                         + [_fmt(x[k], ".0f") for k in ("peak_rss_first_batch_mib",
                                                        "rss_anon_first_batch_mib",
                                                        "rss_file_first_batch_mib")])
    table(["N", "run", "interpreter", "imports", "distributed", "tokenizer", "prepare",
           "first batch", "RSS peak", "anon", "file"], lines)
    if b1:
        build_rate = rows[0]["build"]["groups"] / b1
        print(f"\nbuild on 1 process: {build_rate:.0f} groups/s "
              f"(1M pairs: about {1e6 / build_rate / 60:.0f} min of build on one process)")


def _print_sizes(sizes) -> None:
    print("| pairs | groups | index MiB | build s | build peak RSS | restart to 1st batch s | "
          "restart peak RSS at 1st batch | anon at 1st batch | restart peak RSS at end | "
          "anon at end | batches/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in sizes:
        r, b = s["restart"], s["build"]
        print(f"| {s['pairs']} | {r['groups']} | {r['index_bytes'] / MIB:.2f} | "
              f"{b['prepare_s']:.1f} | {b['peak_rss_mib']:.0f} | {r['first_batch_wall_s']:.2f} | "
              f"{r['peak_rss_first_batch_mib']:.0f} | {r['rss_anon_first_batch_mib']:.0f} | "
              f"{r['peak_rss_mib']:.0f} | {r['rss_anon_end_mib']:.0f} | "
              f"{_fmt(r.get('global_batches_per_s'), '.1f')} |")
    if len(sizes) >= 2:
        lo, hi = sizes[0], sizes[-1]
        dg = hi["restart"]["groups"] - lo["restart"]["groups"]
        for key, what in (("peak_rss_first_batch_mib", "peak RSS at the first batch"),
                          ("rss_anon_first_batch_mib", "anonymous RSS at the first batch"),
                          ("peak_rss_mib", "peak RSS at the end")):
            d = hi["restart"][key] - lo["restart"][key]
            print(f"restart {what}: {d:+.1f} MiB for {dg:+d} groups = "
                  f"{d * MIB / max(dg, 1):.0f} bytes/group")
        di = hi["restart"]["index_bytes"] - lo["restart"]["index_bytes"]
        print(f"lengths index (+ part/position columns): {di / MIB:+.1f} MiB = "
              f"{di / max(dg, 1):.0f} bytes/group; build peak RSS "
              f"{hi['build']['peak_rss_mib'] - lo['build']['peak_rss_mib']:+.0f} MiB")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=1_000_000)
    p.add_argument("--processes", default="1,2,4", help="process counts N ('' = skip)")
    p.add_argument("--baseline_processes", default="1,max",
                   help="N for the no-cache baseline: a list, 'max' (largest N), or 'all'")
    p.add_argument("--sizes", default="", help="pairs per data set for the restart memory "
                   "series, e.g. 20000,100000 ('' = none)")
    p.add_argument("--sizes_processes", type=int, default=0,
                   help="N of the --sizes series (0 = the largest of --processes)")
    p.add_argument("--out_dir", default="/tmp/mio_data_scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=32, help="global groups per batch")
    p.add_argument("--max_length", type=int, default=1024)
    p.add_argument("--batches", type=int, default=200, help="batches timed for the rate")
    p.add_argument("--skip", type=int, default=31,
                   help="batches after the first, before timing (grain reads 16 ahead)")
    p.add_argument("--step_seconds", type=float, default=0.0,
                   help="train step seconds per global batch (0: batch_size / "
                        "--step_pairs_per_s)")
    p.add_argument("--step_pairs_per_s", type=float, default=131.7,
                   help="train step pairs/s (default: SmolLM2-135M on one H100, 8 x 1024, "
                        "docs/benchmarks section 5a)")
    p.add_argument("--timeout", type=float, default=24 * 3600.0, help="per pod, seconds")
    p.add_argument("--child", default="", choices=["", "build", "restart", "nocache"],
                   help=argparse.SUPPRESS)
    p.add_argument("--source", default="", help=argparse.SUPPRESS)
    p.add_argument("--cache_dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--result_dir", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a)
    else:
        a.out_dir = os.path.abspath(a.out_dir)
        parent(a)


if __name__ == "__main__":
    main()
