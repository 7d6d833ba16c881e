"""mio_jax vs TRL 1.16 ``DPOTrainer``: one optimizer step on the same weights, data,
loss and optimizer, alternating the two frameworks step by step in one run; full
fine-tuning, LoRA (against TRL + PEFT), and mio_jax's QLoRA beside them.

* Weights: SmolLM2-135M-Instruct converted once with ``python -m mio_jax.convert
  smollm2 DIR``; mio_jax and TRL (torch) both load DIR's safetensors, float32.
* Data: the same random token ids for both: B pairs, prompt ``round(frac * L)``
  tokens, chosen filling L, rejected L // 8 shorter; TRL's own collator builds its
  ``[2B, L]`` batch, mio_jax's ``collate`` its ``[B, 2, L]`` batch.
* Loss: MIO (mio_jax ``mio`` = TRL ``nca_pair``) or DPO (``sigmoid`` in both), beta 0.1.
* Optimizer: AdamW (lr 1e-5, betas 0.9/0.999, eps 1e-8, no weight decay, no clipping,
  constant lr) over the trainable weights (all of them, or the adapters). TRL: the
  trainer's own optimizer; one step = ``trainer.training_step`` (forward + backward) +
  ``optimizer.step()`` + ``zero_grad``, timed inside the TRL process
  (benchmarks/_trl_driver.py, run with the TRL env's python). mio_jax: the jitted
  ``mio_jax.train_step.train_step`` (state donated), timed in-process.
* Reference: frozen (a reference forward every step) or precomputed (TRL
  ``precompute_ref_log_probs=True``; mio_jax ``reference="precomputed"``). In the LoRA
  modes "frozen" is the base model, i.e. the same weights with the adapters off
  (mio_jax ``reference="base"``; TRL ``ref_model=None`` with a ``peft_config``, which
  disables the adapter for the reference forward): no second copy of the weights.
* Modes (``--modes``, or the shorthands ``--lora`` / ``--qlora``), one fresh process each:
  - ``full``: every weight trains (mio_jax vs TRL);
  - ``lora``: a LoRA adapter trains on the frozen base: rank 16, alpha 32, the seven
    linear modules q/k/v/o/gate/up/down of every layer, dropout 0, PEFT's default
    init (A Kaiming-uniform with bound 1/sqrt(fan_in), B zero). A is drawn once with
    numpy (seed 0) in mio_jax's layout and written as a PEFT adapter folder
    (``mio_jax.models.peft_io.write_adapter``); both frameworks start from that folder
    (mio_jax: ``model.lora.init_from``, through ``mio_jax.models.lora_decoder.load`` as the
    trainer builds its model; TRL: ``DPOTrainer(peft_config=<the folder's LoraConfig>)``
    and then the folder's tensors loaded into the trainer's adapter), so both take the
    same first update;
  - ``nf4`` / ``gguf``: mio_jax alone, the same adapter on a quantized frozen base
    (``model.lora.quantize``): NF4 blocks of 64, or the Q4_1 blocks of the embedded
    SmolLM2 GGUF (the file DIR was converted from) as the file has them. TRL's QLoRA
    needs bitsandbytes' 4-bit layers, which target CUDA GPUs and are not in the TRL
    env, so there is no TRL QLoRA row: these rows set mio_jax's QLoRA step against the
    TRL + PEFT LoRA row of the same case (fp32 base), when that row ran in this
    invocation.
* Checks: at the first step the policy equals the reference in every mode (the
  initial weights, or B = 0), so each framework's first loss must be the loss at zero
  margins (ln 4 for MIO, ln 2 for DPO) within 1e-4; after one identical AdamW update
  the second losses of the two frameworks must agree within 1e-3 (they differ by the
  frameworks' float32 rounding only); with the precomputed reference both frameworks'
  reference log-probs must agree. A failed check is shown in the "parity" column and
  makes the exit status 1.
* Memory: peak RSS of each process (mio_jax: a fresh process per case, so the figure
  includes the JAX runtime and compiled programs; TRL: the driver process) and their
  ratio.

With several modes the table also gives each row's time and peak RSS relative to the
first mode of its (shape, reference, loss) case: ``--mio_only --modes=full,lora,nf4`` is
mio_jax's own full vs LoRA vs QLoRA comparison, each in a fresh process.

TRL is never a dependency of mio_jax: the TRL side runs in a throwaway env
(``--trl_env``, created with ``python3 -m venv`` + ``pip install torch==2.13.0
trl==1.16.0 peft`` when missing). ``--mio_only`` runs the mio_jax side alone (no TRL
env, no comparison; ``--model_dir`` may then also name a random shape of
``_common.SHAPES``, for every mode but ``gguf``), to check that it builds and steps.

  python benchmarks/vs_trl.py --shapes=2x128,8x256 --references=frozen,precomputed
  python benchmarks/vs_trl.py --lora --qlora --shapes=2x128,8x256,8x512 --references=frozen
  python benchmarks/vs_trl.py --mio_only --modes=full,lora,nf4 --shapes=8x256 --references=frozen
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
# The LoRA modes' adapter (PEFT names: r, lora_alpha, target_modules, lora_dropout).
LORA_RANK, LORA_ALPHA, LORA_SEED = 16, 32.0, 0
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODES = ("full", "lora", "nf4", "gguf")  # nf4 / gguf: LoRA on a quantized base, mio_jax only
MIO_ONLY_MODES = ("nf4", "gguf")
FIRST_LOSS_TOL, SECOND_LOSS_TOL = 1e-4, 1e-3
NO_TRL_QLORA = ("no TRL QLoRA: TRL's QLoRA needs bitsandbytes' 4-bit layers, which target "
                "CUDA GPUs and are not in the TRL env (no CPU path is run here); the nf4 / "
                "gguf rows compare against the TRL+peft LoRA row (fp32 base) of the same case")


def ensure_trl_env(path: str) -> str:
    """The TRL env's python; creates the env (venv + pip) when it is missing."""
    py = os.path.join(path, "bin", "python")
    if os.path.exists(py):
        return py
    print(f"creating the throwaway TRL env at {path} (torch 2.13 CPU + TRL 1.16 + peft)",
          flush=True)
    subprocess.run(["python3", "-m", "venv", path], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", "torch==2.13.0",
                    "--index-url", "https://download.pytorch.org/whl/cpu"], check=False)
    subprocess.run([py, "-m", "pip", "install", "-q", "torch==2.13.0", "trl==1.16.0",
                    "transformers>=5", "datasets", "accelerate", "peft"], check=True)
    return py


def ensure_model(path: str) -> str:
    if path not in _common.SHAPES and not os.path.exists(os.path.join(path, "model.safetensors")):
        subprocess.run([sys.executable, "-m", "mio_jax.convert", "smollm2", path], check=True,
                       cwd=ROOT)
    return path


def lora_spec(num_layers: int):
    from mio_jax.models import lora as lora_lib

    return lora_lib.make_spec(rank=LORA_RANK, alpha=LORA_ALPHA, target_modules=list(LORA_TARGETS),
                              num_layers=num_layers, dropout=0.0, init="default")


def draw_adapters(cfg, seed: int = LORA_SEED) -> dict:
    """The starting adapter of the LoRA modes in mio_jax's layout, drawn with numpy so it
    does not depend on either framework's random numbers: A as PEFT's default init
    (uniform, bound 1/sqrt(fan_in)), B zero. ``cfg`` carries the LoraSpec."""
    import numpy as np

    from mio_jax.models.llama import adapter_rows

    rng = np.random.default_rng(seed)
    layers = {}
    for row, _, (a_shape, b_shape) in adapter_rows(cfg):
        bound = 1.0 / float(np.sqrt(np.prod(a_shape[1:-1])))
        layers[f"{row}_lora_a"] = rng.uniform(-bound, bound, a_shape).astype(np.float32)
        layers[f"{row}_lora_b"] = np.zeros(b_shape, np.float32)
    return {"layers": layers}


def _base_storage(other) -> str:
    """How the frozen base's linear rows are held, e.g. "nf4 x7" or "q4_1 x6, f32 x1"."""
    from mio_jax.models.lora import ROW_TO_PEFT

    counts: dict[str, int] = {}
    for name, value in (other.get("layers") or {}).items():
        if name in ROW_TO_PEFT:
            kind = getattr(value, "kind", None) or str(value.dtype).replace("float", "f")
            counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in counts.items())


def build_lora_model(a, workdir: str):
    """The LoRA modes' mio_jax model: ``(graphdef, adapters, base, model_cfg, folder)``.

    The starting adapter is written as a PEFT folder under ``workdir`` (the TRL side loads
    the same folder). A converted model is built as the trainer builds it
    (``lora_decoder.load`` with ``model.lora.init_from`` = the folder, ``quantize`` = the
    mode); a random shape (``--mio_only``) is initialised and given the same adapter."""
    from mio_jax import config as mio_config
    from mio_jax import models
    from mio_jax.models import lora_decoder, peft_io, quant

    quantize = {"lora": "none"}.get(a.mode, a.mode)
    folder = os.path.join(workdir, "adapter")
    if a.model_dir in _common.SHAPES:
        if quantize == "gguf":
            raise ValueError("mode gguf needs the converted SmolLM2 (a random shape has no "
                             "GGUF blocks)")
        shape = _common.SHAPES[a.model_dir]
        cfg = models.ModelConfig(**shape, remat_policy=a.remat,
                                 lora=lora_spec(shape["num_hidden_layers"]))
        start = draw_adapters(cfg)
        peft_io.write_adapter(folder, cfg, cfg.lora, start)
        model = models.init_model(cfg, seed=0)
        lora_decoder.set_adapters(model, start)
        graphdef, params, other = lora_decoder.split(model)
        if quantize != "none":
            other = quant.quantize_base(other, cfg, quantize, None, None)
        return graphdef, params, other, cfg, folder
    structure = models.read_model_config(a.model_dir)
    cfg = models.read_model_config(a.model_dir, lora=lora_spec(structure.num_hidden_layers))
    peft_io.write_adapter(folder, cfg, cfg.lora, draw_adapters(cfg),
                          base_model_name_or_path=a.model_dir)
    c = mio_config.base_config()
    c.seed = LORA_SEED
    c.model.path = a.model_dir if quantize != "gguf" else "smollm2"  # the embedded GGUF
    c.model.remat_policy = a.remat
    c.model.lora.enabled = True
    c.model.lora.rank, c.model.lora.alpha = LORA_RANK, LORA_ALPHA
    c.model.lora.target_modules = ",".join(LORA_TARGETS)
    c.model.lora.dropout = 0.0
    c.model.lora.init_from = folder
    c.model.lora.quantize = quantize
    model = lora_decoder.load(c, models.resolve_model_path(c.model.path), None, None)
    graphdef, params, other = lora_decoder.split(model)
    return graphdef, params, other, model.cfg, folder


def first_step_loss(loss: str) -> float:
    """The loss at zero margins (policy = reference), from the loss registry."""
    import jax.numpy as jnp

    from mio_jax import losses

    logps = jnp.full((1, 2), -10.0)
    val, _ = losses.compute_group(loss, policy_logps=logps, ref_logps=logps, beta=BETA,
                                  lengths=None, valid=jnp.ones((1, 2), bool), loss_weights=None)
    return float(val[0])


def run_case(a) -> dict:
    """One (mode, shape, reference, loss) case in this process: alternating steps
    (mio_jax alone with ``--mio_only`` and in the nf4 / gguf modes)."""
    import jax
    import numpy as np
    import optax

    from mio_jax import train_step
    from mio_jax.data.shared_prompt import to_shared_prompt
    from mio_jax.models import lora_decoder

    b, L = (int(x) for x in a.shape.split("x"))
    lora = a.mode != "full"
    with_trl = not (a.mio_only or a.mode in MIO_ONLY_MODES)
    workdir = tempfile.mkdtemp(prefix="vs_trl_")
    adapter_dir = None
    if lora:
        graphdef, params, other, mcfg, adapter_dir = build_lora_model(a, workdir)
    else:
        graphdef, params, other, mcfg = _common.build_model(a.model_dir, remat_policy=a.remat)
    reference = "base" if lora and a.reference == "frozen" else a.reference
    batch = _common.synthetic_pairs(b, L, a.prompt_frac, mcfg.vocab_size)
    trl = None
    if with_trl:
        pairs = [{"prompt_ids": g.prompt_ids.tolist(), "chosen_ids": g.completion_ids[0].tolist(),
                  "rejected_ids": g.completion_ids[1].tolist()}
                 for g in _common.synthetic_groups(b, L, a.prompt_frac, mcfg.vocab_size)]
        spec = dict(model_dir=a.model_dir, pairs=pairs, loss_type=TRL_LOSS[a.loss], beta=BETA,
                    lr=LR, precompute=a.reference == "precomputed", threads=a.threads,
                    # like for like: TRL recomputes activations exactly when mio_jax does
                    gradient_checkpointing=a.remat != "none", adapter_dir=adapter_dir)
        spec_path = os.path.join(workdir, "spec.json")
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
                                reference=reference, lengths=False)
    tx = optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    state = _common.init_state(params, tx)
    ref_params = params if reference == "frozen" else None
    trainable = lora_decoder.parameter_count(params)[0]
    mio_ref = None
    if a.reference == "precomputed":  # the base's log-probs in the LoRA modes
        mio_ref = np.asarray(jax.jit(lambda p, o, x: train_step.reference_logps(
            graphdef, p, o, x, cfg, view="base"))(params, other, batch))
        batch = batch.replace(ref_logps=mio_ref)
    del params  # the state holds the trainable weights (the frozen reference its own)
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
    out = dict(mode=a.mode, shape=a.shape, reference=reference, loss=a.loss, remat=a.remat,
               layout=a.layout, proj=a.proj, base=_base_storage(other),
               trl_batch_shape=ready.get("batch_shape"), compile_s=compile_s,
               times=times, losses=losses, margins=margins,
               expected_first_loss=first_step_loss(a.loss),
               trainable={"mio_jax": trainable, "trl": ready.get("trainable")},
               trl_reference=ready.get("reference"),
               mio_rss_gb=_common.host_peak_rss_bytes() / 2**30,
               trl_rss_gb=None if trl_rss is None else trl_rss / 2**30)
    if ready.get("ref_logps") and mio_ref is not None:
        trl_ref = np.asarray(ready["ref_logps"]).T  # [B, 2]
        out["ref_logps_max_abs_diff"] = float(np.max(np.abs(trl_ref - mio_ref)))
        out["ref_logps_scale"] = float(np.max(np.abs(mio_ref)))
    return out


def parity(res: dict) -> str:
    """"ok", or what failed: the first loss of each framework against the loss at zero
    margins, the second losses against each other, the trainable sizes, the reference
    log-probs (precomputed)."""
    bad = []
    want = res["expected_first_loss"]
    for who, ls in res["losses"].items():
        if ls and abs(ls[0] - want) > FIRST_LOSS_TOL:
            bad.append(f"{who} step-1 loss {ls[0]:.6f} != {want:.6f}")
    ls = res["losses"]
    if "trl" in ls and len(ls["trl"]) > 1 and len(ls["mio_jax"]) > 1:
        d = abs(ls["trl"][1] - ls["mio_jax"][1])
        if d > SECOND_LOSS_TOL:
            bad.append(f"step-2 losses differ by {d:.2e}")
    n = res.get("trainable") or {}
    if n.get("trl") is not None and n["trl"] != n["mio_jax"]:
        bad.append(f"trainable values mio_jax {n['mio_jax']} vs TRL {n['trl']}")
    if res.get("ref_logps_max_abs_diff") is not None:
        # float32 sums over up to L tokens: allow 1e-5 of the largest magnitude
        if res["ref_logps_max_abs_diff"] > max(1e-3, 1e-5 * res["ref_logps_scale"]):
            bad.append(f"reference log-probs differ by {res['ref_logps_max_abs_diff']:.2e}")
    return "ok" if not bad else "FAIL: " + "; ".join(bad)


def _losses(res: dict, who: str) -> str:
    return ",".join(f"{x:.5f}" for x in res["losses"].get(who, [])[:2])


def _row(res: dict, b: int) -> dict:
    mode = res.get("mode", "full")
    tm = _common.median(res["times"]["mio_jax"])
    row = {"mode": mode, "shape": res["shape"], "reference": res["reference"],
           "loss": res["loss"], "mio_jax remat": res.get("remat", "none"),
           "mio_jax layout": res.get("layout", "unshared"),
           "mio_jax proj": res.get("proj", "full"), "frozen base": res.get("base", ""),
           "trainable": res.get("trainable", {}).get("mio_jax", ""),
           "mio_jax s/step": tm, "mio_jax pairs/s": b / tm,
           "mio_jax peak RSS GiB": res["mio_rss_gb"],
           "loss steps 1-2 (mio_jax / TRL)": _losses(res, "mio_jax"),
           "parity": parity(res)}
    if "trl" not in res["times"]:  # --mio_only, or a QLoRA mode
        return row
    tt = _common.median(res["times"]["trl"])
    n = min(len(res["losses"]["mio_jax"]), len(res["losses"]["trl"]), 2)
    loss_diff = max(abs(res["losses"]["mio_jax"][i] - res["losses"]["trl"][i]) for i in range(n))
    row.update({
        "TRL side": "TRL+peft LoRA" if mode == "lora" else "TRL",
        "TRL s/step": tt, "TRL pairs/s": b / tt, "speed-up": tt / tm,
        "TRL peak RSS GiB": res["trl_rss_gb"],
        "RSS mio_jax/TRL": res["mio_rss_gb"] / res["trl_rss_gb"],
        "loss steps 1-2 (mio_jax / TRL)": _losses(res, "mio_jax") + " / " + _losses(res, "trl"),
        "max loss diff": loss_diff,
        "ref logps max diff": res.get("ref_logps_max_abs_diff", "")})
    return row


def _cross_rows(rows: list[dict], cases: list[tuple], modes: list[str]) -> None:
    """Fills in, per (shape, reference, loss) case: a QLoRA row's TRL columns from the
    TRL+peft LoRA row of the same case; with several modes, each row's time and peak RSS
    over those of the case's first mode."""
    by_case: dict[tuple, dict[str, dict]] = {}
    for key, row in zip(cases, rows):
        by_case.setdefault(key, {})[row["mode"]] = row
    for group in by_case.values():
        peft = group.get("lora")
        for mode, row in group.items():
            if mode in MIO_ONLY_MODES and peft is not None and "TRL s/step" in peft:
                tt, rss = peft["TRL s/step"], peft["TRL peak RSS GiB"]
                row.update({"TRL side": "TRL+peft LoRA row (no CPU QLoRA)", "TRL s/step": tt,
                            "TRL pairs/s": peft["TRL pairs/s"],
                            "speed-up": tt / row["mio_jax s/step"], "TRL peak RSS GiB": rss,
                            "RSS mio_jax/TRL": row["mio_jax peak RSS GiB"] / rss})
        first = next((group[m] for m in modes if m in group), None)
        if len(group) > 1 and first is not None:
            for row in group.values():
                row[f"s/step vs {first['mode']}"] = row["mio_jax s/step"] / first["mio_jax s/step"]
                row[f"RSS vs {first['mode']}"] = (row["mio_jax peak RSS GiB"]
                                                  / first["mio_jax peak RSS GiB"])


COLS = ["mode", "shape", "reference", "loss", "mio_jax remat", "mio_jax layout", "mio_jax proj",
        "frozen base", "trainable", "TRL side", "mio_jax s/step", "TRL s/step",
        "mio_jax pairs/s", "TRL pairs/s", "speed-up", "mio_jax peak RSS GiB", "TRL peak RSS GiB",
        "RSS mio_jax/TRL", "loss steps 1-2 (mio_jax / TRL)", "max loss diff",
        "ref logps max diff", "parity"]


def _modes(a) -> list[str]:
    if a.modes:
        modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    elif a.lora or a.qlora:
        modes = ["lora"] + [k.strip() for k in (a.qlora or "").split(",") if k.strip()]
    else:
        modes = ["full"]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; choose from {list(MODES)}")
    return modes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="2x128,8x256", help="PAIRSxLENGTH list")
    p.add_argument("--references", default="frozen,precomputed",
                   help="frozen and/or precomputed (frozen = the base in the LoRA modes)")
    p.add_argument("--losses", default="mio", help="mio and/or sigmoid")
    p.add_argument("--modes", default="", help="comma list of " + ", ".join(MODES)
                   + " (default: full; --lora / --qlora set it)")
    p.add_argument("--lora", action="store_true",
                   help="LoRA: mio_jax vs TRL+peft, the same rank-16 adapter on the same base")
    p.add_argument("--qlora", nargs="?", const="nf4,gguf", default="",
                   help="with (or implying) --lora, also mio_jax's LoRA on a quantized base: "
                        "nf4 and/or gguf (default both); mio_jax only")
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
    p.add_argument("--mode", default="full", help=argparse.SUPPRESS)
    p.add_argument("--shape", default="", help=argparse.SUPPRESS)
    p.add_argument("--reference", default="", help=argparse.SUPPRESS)
    p.add_argument("--loss", default="", help=argparse.SUPPRESS)
    p.add_argument("--trl_python", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.case:
        print("CASE " + json.dumps(run_case(a)), flush=True)
        return 0
    modes = _modes(a)
    print(f"machine: {_common.machine()}", flush=True)
    needs_trl = not a.mio_only and any(m not in MIO_ONLY_MODES for m in modes)
    trl_python = ensure_trl_env(a.trl_env) if needs_trl else ""
    ensure_model(a.model_dir)
    if not a.mio_only and any(m in MIO_ONLY_MODES for m in modes):
        print(NO_TRL_QLORA, flush=True)
    results, rows, cases, failed = [], [], [], []
    for shape in a.shapes.split(","):
        for ref in a.references.split(","):
            for loss in a.losses.split(","):
                for mode in modes:
                    cmd = [sys.executable, os.path.abspath(__file__), "--case", f"--mode={mode}",
                           f"--shape={shape}", f"--reference={ref}", f"--loss={loss}",
                           f"--prompt_frac={a.prompt_frac}", f"--steps={a.steps}",
                           f"--warmup={a.warmup}", f"--threads={a.threads}",
                           f"--model_dir={a.model_dir}", f"--trl_python={trl_python}",
                           f"--remat={a.remat}", f"--layout={a.layout}", f"--proj={a.proj}"]
                    cmd += ["--mio_only"] if a.mio_only else []
                    print(f"case mode={mode} {shape} reference={ref} loss={loss}", flush=True)
                    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
                    got = [json.loads(line[5:]) for line in proc.stdout.splitlines()
                           if line.startswith("CASE ")]
                    if not got:
                        print(proc.stdout[-2000:], file=sys.stderr)
                        failed.append(f"mode={mode} {shape} reference={ref} loss={loss}")
                        continue
                    results.append(got[0])
                    rows.append(_row(got[0], int(shape.split("x")[0])))
                    cases.append((shape, ref, loss))
                    _common.print_table(rows[-1:], [c for c in COLS if c in rows[-1]])
    _cross_rows(rows, cases, modes)
    extra = [k for r in rows for k in r if k not in COLS]  # the "vs <first mode>" columns
    cols = [c for c in COLS + list(dict.fromkeys(extra)) if any(c in r for r in rows)]
    print()
    _common.print_table(rows, cols)
    if not a.mio_only and any(m in MIO_ONLY_MODES for m in modes):
        print("\n" + NO_TRL_QLORA)
    for r in rows:
        if r["parity"] != "ok":
            print(f"parity check failed: mode={r['mode']} {r['shape']} {r['reference']} "
                  f"{r['loss']}: {r['parity']}", file=sys.stderr)
    for f in failed:
        print(f"case failed: {f}", file=sys.stderr)
    _common.dump_json(a.json, {"machine": _common.machine(), "rows": rows, "results": results})
    return 1 if failed or any(r["parity"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
