"""Writes tests/models/golden_peft.json: logits of peft LoRA adapters on the tiny golden
checkpoints of scripts/golden_model_logits.py and on SmolLM2-135M, computed by peft itself.

For each tiny family the base model is that script's (same `build`, same weights); peft
wraps it with a LoRA config of its own per case (rsLoRA, a subset of targets, one layer
only, or the plain all-linear r=4 / alpha=8), every `lora_A` / `lora_B` tensor is set to
`LORA_FACTOR * tensor_value(<the name peft saves it under>, shape, seed=LORA_SEED)`, and
logits are recorded at the golden positions with the adapter on, with it disabled and
after `merge_and_unload()`. SmolLM2-135M (the GGUF in the mio_jax venv, converted to an HF
folder with `python -m mio_jax.convert smollm2 DIR`) gets a rank-8 all-linear adapter drawn
the same way, and logit summaries on one prompt. The tests rebuild bases and adapters
from the names and shapes stored here, without torch.

Run from the repository root (needs torch + transformers 5 + peft; no network):
  /work/trl_env/bin/python scripts/golden_peft.py [--venv_python .venv/bin/python]
  /work/trl_env/bin/python scripts/golden_peft.py --cases gemma,gemma2,gemma3
      (only these tiny cases; the others and SmolLM2 kept as stored, each case keeps the
      versions it was made with)
Check that an adapter folder written by mio_jax (`peft_io.write_adapter`) loads in peft
with no missing or unexpected keys and gives the golden logits:
  /work/trl_env/bin/python scripts/golden_peft.py --check-export DIR --case NAME
Never imported by the package or the tests.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open

from golden_model_logits import ATTENTION_MASK, CASES, INPUT_IDS, LOGIT_POSITIONS, SEED, build, \
    tensor_value
from golden_smollm2 import SLICE, summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "models", "golden_peft.json")
LORA_SEED = SEED + 1
LORA_FACTOR = 0.5  # so that the adapter moves the logits by about as much as the base spreads them
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE_LORA = dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR)
LORA_CASES = {  # per tiny family: what this case varies from BASE_LORA
    "llama2": dict(use_rslora=True),
    "llama3": {},
    "mistral": dict(target_modules=["q_proj", "v_proj"]),
    "qwen2": dict(layers_to_transform=[1]),
    "qwen3": {},
    # a regex (PEFT full-matches it against module paths): rows differ in their layers
    "smollm": dict(target_modules=r"model\.layers\.0\.self_attn\.(o|v)_proj|.*\.1\.mlp\.\w+_proj"),
    "gemma": dict(target_modules=["q_proj", "v_proj", "down_proj"]),
    "gemma2": {},
    "gemma3": dict(use_rslora=True),
}
SMOLLM2_LORA = dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR)
SMOLLM2_FACTOR = 0.2  # 30 layers: smaller adapters keep the logits in a sensible range
SMOLLM2_PROMPT = "The capital of France is"


def lora_config(kwargs):
    return LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **kwargs)


def set_adapter_weights(model, factor):
    """Sets every LoRA tensor from its saved name; returns {saved name: shape}."""
    names = get_peft_model_state_dict(model)
    state = {n: torch.from_numpy(factor * tensor_value(n, tuple(t.shape), seed=LORA_SEED))
             for n, t in names.items()}
    result = set_peft_model_state_dict(model, state)
    assert not result.unexpected_keys, result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k], result.missing_keys
    after = get_peft_model_state_dict(model)
    for n, t in state.items():
        assert torch.equal(after[n], t), n
    assert all(float(t.abs().max()) > 0 for n, t in state.items() if "lora_B" in n)
    return {n: list(t.shape) for n, t in sorted(state.items())}


@torch.no_grad()
def tiny_logits(model):
    ids, mask = torch.tensor(INPUT_IDS), torch.tensor(ATTENTION_MASK)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    return out[:, LOGIT_POSITIONS, :].double().numpy()


@torch.no_grad()
def sequence_logits(model, ids):
    return model(input_ids=torch.tensor([ids])).logits[0].double().numpy()


def saved_adapter(model):
    """What `save_pretrained` writes: adapter_config.json and {tensor name: shape}."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        with open(os.path.join(tmp, "adapter_config.json")) as f:
            config = json.load(f)
        with safe_open(os.path.join(tmp, "adapter_model.safetensors"), "pt") as f:
            tensors = {n: list(f.get_slice(n).get_shape()) for n in sorted(f.keys())}
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    return config, tensors


def rounded(a):
    return np.round(np.asarray(a, np.float64), 6).tolist()


def tiny_case(case):
    base, hf_config, tensors = build(case)
    base_logits = tiny_logits(base)
    kwargs = dict(BASE_LORA, **LORA_CASES[case])
    model = get_peft_model(base, lora_config(kwargs)).eval()
    adapter_tensors = set_adapter_weights(model, LORA_FACTOR)
    config, saved = saved_adapter(model)
    assert saved == adapter_tensors, (sorted(saved), sorted(adapter_tensors))
    on = tiny_logits(model)
    with model.disable_adapter():
        off = tiny_logits(model)
    assert np.array_equal(off, base_logits)
    merged = tiny_logits(model.merge_and_unload())
    print(f"{case}: |on - off| max {np.abs(on - off).max():.3f}, |merged - on| max "
          f"{np.abs(merged - on).max():.2e}, logits range {on.min():.2f}..{on.max():.2f}")
    return {"config": hf_config, "tensors": tensors, "lora": kwargs, "factor": LORA_FACTOR,
            "adapter_config": config, "adapter_tensors": adapter_tensors,
            "logits": rounded(on), "logits_disabled": rounded(off),
            "logits_merged": rounded(merged),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__}}


def smollm2_folder(venv_python, dst):
    subprocess.run([venv_python, "-m", "mio_jax.convert", "smollm2", dst], cwd=ROOT, check=True,
                   capture_output=True)
    return dst


def smollm2_base(venv_python):
    folder = smollm2_folder(venv_python, os.path.join(tempfile.mkdtemp(), "smollm2"))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    return model, tok


def smollm2_case(venv_python):
    base, tok = smollm2_base(venv_python)
    ids = tok.encode(SMOLLM2_PROMPT)
    base_logits = sequence_logits(base, ids)
    model = get_peft_model(base, lora_config(SMOLLM2_LORA)).eval()
    adapter_tensors = set_adapter_weights(model, SMOLLM2_FACTOR)
    config, saved = saved_adapter(model)
    assert saved == adapter_tensors
    on = sequence_logits(model, ids)
    with model.disable_adapter():
        off = sequence_logits(model, ids)
    assert np.array_equal(off, base_logits)
    merged = sequence_logits(model.merge_and_unload(), ids)
    print(f"smollm2: |on - off| max {np.abs(on - off).max():.3f}, |merged - on| max "
          f"{np.abs(merged - on).max():.2e}, argmax on {on.argmax(-1).tolist()} off "
          f"{off.argmax(-1).tolist()}")
    return {"text": SMOLLM2_PROMPT, "ids": ids, "lora": SMOLLM2_LORA, "factor": SMOLLM2_FACTOR,
            "adapter_config": config, "adapter_tensors": adapter_tensors,
            "on": summary(on), "disabled": summary(off), "merged": summary(merged),
            "max_abs_diff_merged_vs_on": float(np.abs(merged - on).max())}


def check_export(folder, case, venv_python):
    """Loads `folder` (mio_jax's export) onto the case's base with PeftModel.from_pretrained."""
    with open(OUT) as f:
        golden = json.load(f)
    if case == "smollm2":
        base, tok = smollm2_base(venv_python)
        want = golden["smollm2"]
    else:
        base, _, _ = build(case)
        want = golden["cases"][case]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, folder).eval()
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as f:
        in_file = set(f.keys())
    in_model = set(get_peft_model_state_dict(model))
    report = {"case": case, "warnings": [str(w.message) for w in caught],
              "missing_keys": sorted(in_model - in_file),
              "unexpected_keys": sorted(in_file - in_model),
              "peft_config": {k: (sorted(v) if isinstance(v, set) else v) for k, v in
                              model.peft_config["default"].to_dict().items()
                              if k in ("r", "lora_alpha", "use_rslora", "target_modules",
                                       "layers_to_transform")}}
    if case == "smollm2":
        got = summary(sequence_logits(model, want["ids"]))
        report["max_abs_diff_vs_golden"] = max(
            float(np.abs(np.asarray(got[k]) - np.asarray(want["on"][k])).max())
            for k in ("slice_values", "mean", "std", "logsumexp", "last_topk_values"))
        report["topk_equal"] = got["last_topk_ids"] == want["on"]["last_topk_ids"]
    else:
        got = tiny_logits(model)
        report["max_abs_diff_vs_golden"] = float(np.abs(got - np.asarray(want["logits"])).max())
    print(json.dumps(report, indent=1, default=str))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--venv_python", default=os.path.join(ROOT, ".venv", "bin", "python"))
    parser.add_argument("--check-export")
    parser.add_argument("--case")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--cases", help="comma-separated tiny cases to (re)compute")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.check_export:
        check_export(args.check_export, args.case, args.venv_python)
        return
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__}
    if args.cases:
        with open(OUT) as f:
            stored = json.load(f)
        todo = args.cases.split(",")
        cases = {c: stored["cases"][c] if c not in todo else tiny_case(c) for c in CASES}
        smollm2 = stored["smollm2"]
    else:
        cases = {case: tiny_case(case) for case in CASES}
        smollm2 = None if args.skip_smollm2 else dict(smollm2_case(args.venv_python),
                                                      versions=versions)
    out = {"generator": "scripts/golden_peft.py", "seed": SEED, "lora_seed": LORA_SEED, "input_ids": INPUT_IDS,
           "attention_mask": ATTENTION_MASK, "logit_positions": LOGIT_POSITIONS,
           "slice": list(SLICE), "cases": cases, "smollm2": smollm2}
    with open(OUT, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print("wrote", OUT, os.path.getsize(OUT), "bytes")


if __name__ == "__main__":
    sys.exit(main())
