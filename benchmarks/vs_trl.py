"""mio_jax vs TRL 1.16 ``DPOTrainer``: one optimizer step on the same weights, data,
loss and optimizer, alternating the two frameworks step by step in one run.

* Weights: SmolLM2-135M-Instruct converted once with ``python -m mio_jax.convert
  smollm2 DIR``; mio_jax and TRL (torch) both load DIR's safetensors, float32.
* Data: the same random token ids for both: B pairs, prompt ``round(frac * L)``
  tokens, chosen filling L, rejected L // 8 shorter; TRL's own collator builds its
  ``[2B, L]`` batch, mio_jax's ``collate`` its ``[B, 2, L]`` batch.
* Loss: MIO (mio_jax ``mio`` = TRL ``nca_pair``) or DPO (``sigmoid`` in both), beta 0.1.
* Optimizer: AdamW (lr 1e-5, betas 0.9/0.999, eps 1e-8, no weight decay, no clipping,
  constant lr). TRL: the trainer's own optimizer; one step = ``trainer.training_step``
  (forward + backward) + ``optimizer.step()`` + ``zero_grad``, timed inside the TRL
  process (benchmarks/_trl_driver.py, run with the TRL env's python). mio_jax: the
  jitted ``mio_jax.train_step.train_step`` (state donated), timed in-process.
* Reference: frozen (a reference forward every step) or precomputed (TRL
  ``precompute_ref_log_probs=True``; mio_jax ``reference="precomputed"``).
* Checks: with the precomputed reference both frameworks' reference log-probs
  (same weights, same data) must agree; the losses of the first two steps (the
  second after one identical AdamW update) must agree within a loose tolerance.
* Memory: peak RSS of each process (mio_jax: a fresh process per case, so the
  figure includes the JAX runtime and compiled programs; TRL: the driver process).

TRL is never a dependency of mio_jax: the TRL side runs in a throwaway env
(``--trl_env``, created with ``python3 -m venv`` + ``pip install torch==2.13.0
trl==1.16.0`` when missing). ``--mio_only`` runs the mio_jax side alone (no TRL env, no
comparison; ``--model_dir`` may then also name a random shape of ``_common.SHAPES``), to
check that it builds and steps.

  python benchmarks/vs_trl.py --shapes=2x128,8x256 --references=frozen,precomputed
  python benchmarks/vs_trl.py --mio_only --model_dir=tiny --shapes=2x32 --steps=1 --warmup=0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

if __package__:  # python -m benchmarks.vs_trl
    from . import _common
else:  # python benchmarks/vs_trl.py (this folder is sys.path[0])
    import _common

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

TRL_LOSS = {"mio": "nca_pair", "sigmoid": "sigmoid"}
LR, BETA = 1e-5, 0.1


def ensure_trl_env(path: str) -> str:
    """The TRL env's python; creates the env (venv + pip) when it is missing."""
    py = os.path.join(path, "bin", "python")
    if os.path.exists(py):
        return py
    print(f"creating the throwaway TRL env at {path} (torch 2.13 CPU + TRL 1.16)", flush=True)
    subprocess.run(["python3", "-m", "venv", path], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", "torch==2.13.0",
                    "--index-url", "https://download.pytorch.org/whl/cpu"], check=False)
    subprocess.run([py, "-m", "pip", "install", "-q", "torch==2.13.0", "trl==1.16.0",
                    "transformers>=5", "datasets", "accelerate"], check=True)
    return py


def ensure_model(path: str) -> str:
    if path not in _common.SHAPES and not os.path.exists(os.path.join(path, "model.safetensors")):
        subprocess.run([sys.executable, "-m", "mio_jax.convert", "smollm2", path], check=True,
                       cwd=ROOT)
    return path


def run_case(a) -> dict:
    """One (shape, reference, loss) case in this process: alternating steps (mio_jax
    alone with ``--mio_only``)."""
    import jax
    import numpy as np
    import optax

    from mio_jax import train_step
    from mio_jax.data.shared_prompt import to_shared_prompt

    b, L = (int(x) for x in a.shape.split("x"))
    graphdef, params, other, mcfg = _common.build_model(a.model_dir, remat_policy=a.remat)
    batch = _common.synthetic_pairs(b, L, a.prompt_frac, mcfg.vocab_size)
    trl = None
    if not a.mio_only:
        pairs = [{"prompt_ids": g.prompt_ids.tolist(), "chosen_ids": g.completion_ids[0].tolist(),
                  "rejected_ids": g.completion_ids[1].tolist()}
                 for g in _common.synthetic_groups(b, L, a.prompt_frac, mcfg.vocab_size)]
        spec = dict(model_dir=a.model_dir, pairs=pairs, loss_type=TRL_LOSS[a.loss], beta=BETA,
                    lr=LR, precompute=a.reference == "precomputed", threads=a.threads,
                    # like for like: TRL recomputes activations exactly when mio_jax does
                    gradient_checkpointing=a.remat != "none")
        spec_path = os.path.join(tempfile.mkdtemp(prefix="vs_trl_"), "spec.json")
        with open(spec_path, "w", encoding="utf-8") as f:
            json.dump(spec, f)
        trl = subprocess.Popen([a.trl_python, os.path.join(HERE, "_trl_driver.py"), spec_path],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               env=dict(os.environ, TQDM_DISABLE="1",
                                        TOKENIZERS_PARALLELISM="false"))

    def trl_call(cmd: str | None) -> dict:
        if cmd:
            trl.stdin.write(cmd + "\n")
            trl.stdin.flush()
        while True:
            line = trl.stdout.readline()
            if not line:
                raise RuntimeError(f"TRL driver exited (code {trl.poll()}); see its stderr above")
            if line.startswith("{"):
                return json.loads(line)

    cfg = train_step.StepConfig(loss_name=a.loss, beta=BETA, chunk_size=8192,
                                reference=a.reference, lengths=False)
    tx = optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    state = _common.init_state(params, tx)
    ref_params = params if a.reference == "frozen" else None
    mio_ref = np.asarray(jax.jit(lambda p, o, x: train_step.reference_logps(graphdef, p, o, x, cfg))(
        params, other, batch))
    if a.reference == "precomputed":
        batch = batch.replace(ref_logps=mio_ref)
        del params
    if a.layout == "shared":  # the trainer's data.shared_prompt: each prompt runs once
        batch = to_shared_prompt(batch)
    if a.proj == "completion":  # model.completion_logits_fraction, sized to this batch
        cfg = dataclasses.replace(cfg, max_tokens_fraction=_common.completion_fraction(batch))
    consts = train_step.StepConsts(other, ref_params)
    batch = jax.device_put(batch)
    t0 = time.perf_counter()
    step = _common.jit_train_step(graphdef, tx, cfg, LR).lower(state, batch, consts).compile()
    compile_s = time.perf_counter() - t0
    ready = trl_call(None) if trl else {}
    who_all = ("mio_jax",) if trl is None else ("mio_jax", "trl")
    times = {w: [] for w in who_all}
    losses = {w: [] for w in who_all}
    margins = {w: [] for w in who_all}
    for r in range(a.warmup + a.steps):
        for who in (who_all if r % 2 else who_all[::-1]):
            if who == "trl":
                res = trl_call("step")
                dt, loss, marg = res["t"], res["loss"], res["margins"]
            else:
                t0 = time.perf_counter()
                state, m = step(state, batch, consts)
                jax.block_until_ready((state, m))
                dt = time.perf_counter() - t0
                loss, marg = float(m["loss"]), float(m["rewards/margins"])
            if r >= a.warmup:
                times[who].append(dt)
            losses[who].append(loss)
            margins[who].append(marg)
        if r >= a.warmup:
            print(f"round {r}: " + ", ".join(f"{w} {times[w][-1]:.2f} s"
                                            for w in ("trl", "mio_jax") if w in times),
                  file=sys.stderr, flush=True)
    trl_rss = None
    if trl is not None:
        trl_rss = trl_call("quit")["peak_rss_bytes"]
        trl.wait(timeout=60)
    out = dict(shape=a.shape, reference=a.reference, loss=a.loss, remat=a.remat, layout=a.layout,
               proj=a.proj,
               trl_batch_shape=ready.get("batch_shape"), compile_s=compile_s,
               times=times, losses=losses, margins=margins,
               mio_rss_gb=_common.host_peak_rss_bytes() / 2**30,
               trl_rss_gb=None if trl_rss is None else trl_rss / 2**30)
    if ready.get("ref_logps"):
        trl_ref = np.asarray(ready["ref_logps"]).T  # [B, 2]
        out["ref_logps_max_abs_diff"] = float(np.max(np.abs(trl_ref - mio_ref)))
        out["ref_logps_scale"] = float(np.max(np.abs(mio_ref)))
    return out


def _row(res: dict, b: int) -> dict:
    if "trl" not in res["times"]:  # --mio_only
        tm = _common.median(res["times"]["mio_jax"])
        return {"shape": res["shape"], "reference": res["reference"], "loss": res["loss"],
                "mio_jax remat": res["remat"], "mio_jax layout": res["layout"],
                "mio_jax proj": res["proj"], "mio_jax s/step": tm, "mio_jax pairs/s": b / tm,
                "mio_jax peak RSS GiB": res["mio_rss_gb"],
                "loss steps 1-2 (mio_jax / TRL)": ",".join(
                    f"{x:.5f}" for x in res["losses"]["mio_jax"][:2])}
    tm, tt = _common.median(res["times"]["mio_jax"]), _common.median(res["times"]["trl"])
    n = min(len(res["losses"]["mio_jax"]), len(res["losses"]["trl"]), 2)
    loss_diff = max(abs(res["losses"]["mio_jax"][i] - res["losses"]["trl"][i]) for i in range(n))
    return {"shape": res["shape"], "reference": res["reference"], "loss": res["loss"],
            "mio_jax remat": res.get("remat", "none"),
            "mio_jax layout": res.get("layout", "unshared"),
            "mio_jax proj": res.get("proj", "full"),
            "mio_jax s/step": tm, "TRL s/step": tt, "mio_jax pairs/s": b / tm,
            "TRL pairs/s": b / tt, "speed-up": tt / tm, "mio_jax peak RSS GiB": res["mio_rss_gb"],
            "TRL peak RSS GiB": res["trl_rss_gb"],
            "loss steps 1-2 (mio_jax / TRL)": " / ".join(
                ",".join(f"{x:.5f}" for x in res["losses"][w][:2]) for w in ("mio_jax", "trl")),
            "max loss diff": loss_diff,
            "ref logps max diff": res.get("ref_logps_max_abs_diff", "")}


COLS = ["shape", "reference", "loss", "mio_jax remat", "mio_jax layout", "mio_jax proj",
        "mio_jax s/step", "TRL s/step",
        "mio_jax pairs/s", "TRL pairs/s", "speed-up", "mio_jax peak RSS GiB", "TRL peak RSS GiB",
        "loss steps 1-2 (mio_jax / TRL)", "max loss diff", "ref logps max diff"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="2x128,8x256", help="PAIRSxLENGTH list")
    p.add_argument("--references", default="frozen,precomputed")
    p.add_argument("--losses", default="mio", help="mio and/or sigmoid")
    p.add_argument("--prompt_frac", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--remat", default="none", help="mio_jax remat policy; TRL runs with gradient checkpointing "
                   "exactly when this is not 'none'")
    p.add_argument("--layout", default="unshared", choices=("unshared", "shared"),
                   help="mio_jax batch layout (shared = data.shared_prompt); TRL is unshared")
    p.add_argument("--proj", default="full", choices=("full", "completion"),
                   help="mio_jax output projection: every position, or completion positions "
                        "only (model.completion_logits_fraction); TRL projects every position")
    p.add_argument("--model_dir", default="/tmp/mio_jax_smollm2_hf",
                   help="the converted SmolLM2 folder (made when missing); with --mio_only "
                        "also a random shape: " + " | ".join(_common.SHAPES))
    p.add_argument("--trl_env", default="/work/trl_env")
    p.add_argument("--mio_only", action="store_true",
                   help="run the mio_jax side alone: no TRL env, no comparison")
    p.add_argument("--json", default="")
    p.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", default="", help=argparse.SUPPRESS)
    p.add_argument("--reference", default="", help=argparse.SUPPRESS)
    p.add_argument("--loss", default="", help=argparse.SUPPRESS)
    p.add_argument("--trl_python", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.case:
        print("CASE " + json.dumps(run_case(a)), flush=True)
        return None
    print(f"machine: {_common.machine()}", flush=True)
    trl_python = "" if a.mio_only else ensure_trl_env(a.trl_env)
    ensure_model(a.model_dir)
    results, rows = [], []
    for shape in a.shapes.split(","):
        for ref in a.references.split(","):
            for loss in a.losses.split(","):
                cmd = [sys.executable, os.path.abspath(__file__), "--case", f"--shape={shape}",
                       f"--reference={ref}", f"--loss={loss}", f"--prompt_frac={a.prompt_frac}",
                       f"--steps={a.steps}", f"--warmup={a.warmup}", f"--threads={a.threads}",
                       f"--model_dir={a.model_dir}", f"--trl_python={trl_python}",
                       f"--remat={a.remat}", f"--layout={a.layout}", f"--proj={a.proj}"]
                cmd += ["--mio_only"] if a.mio_only else []
                print(f"case {shape} reference={ref} loss={loss}", flush=True)
                proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
                got = [json.loads(line[5:]) for line in proc.stdout.splitlines()
                       if line.startswith("CASE ")]
                if not got:
                    print(proc.stdout[-2000:], file=sys.stderr)
                    continue
                results.append(got[0])
                rows.append(_row(got[0], int(shape.split("x")[0])))
                _common.print_table(rows[-1:], COLS)
    print()
    _common.print_table(rows, COLS)
    _common.dump_json(a.json, {"machine": _common.machine(), "rows": rows, "results": results})


if __name__ == "__main__":
    main()
