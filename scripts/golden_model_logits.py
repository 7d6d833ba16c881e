"""Writes tests/models/golden_logits.json: torch transformers logits and greedy ids for tiny
random Llama / Llama 3 / Mistral / Qwen2 / Qwen3 / SmolLM-style / Gemma 1, 2, 3 checkpoints.

Weights are drawn per tensor from numpy with a seed derived from the tensor name
(`tensor_value` below, duplicated in tests/models/test_llama.py), so the tests rebuild the
same checkpoints without torch and without committing weight files.

Run (needs torch + transformers 5; no network):
  /work/trl_env/bin/python scripts/golden_model_logits.py
  /work/trl_env/bin/python scripts/golden_model_logits.py --cases gemma2,gemma3
      (only these cases, the others kept as stored)
Check an exported folder loads in transformers with no missing/unexpected keys:
  /work/trl_env/bin/python scripts/golden_model_logits.py --check-export DIR --case NAME
"""

import argparse
import json
import os
import tempfile
import zlib

import numpy as np
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "models", "golden_logits.json")
SEED = 1234
INPUT_IDS = [[5, 17, 33, 2, 64, 90, 11], [0, 0, 41, 7, 77, 13, 58]]  # row 1 left-padded by 2
ATTENTION_MASK = [[1] * 7, [0, 0, 1, 1, 1, 1, 1]]
LOGIT_POSITIONS = [2, 4, 6]
MAX_NEW_TOKENS = 8

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
              max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
CASES = {
    "llama2": (transformers.LlamaConfig, dict(COMMON, num_key_value_heads=4, rope_theta=10000.0)),
    "llama3": (transformers.LlamaConfig, dict(
        COMMON, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "mistral": (transformers.MistralConfig, dict(COMMON, sliding_window=4, rope_theta=1e6)),
    "qwen2": (transformers.Qwen2Config, dict(COMMON, rope_theta=1e6)),
    "qwen3": (transformers.Qwen3Config, dict(COMMON, head_dim=16, rope_theta=1e6)),
    "smollm": (transformers.LlamaConfig, dict(COMMON, num_attention_heads=4, num_key_value_heads=1,
                                              tie_word_embeddings=True, rope_theta=1e5)),
    # Gemma: head_dim and the query scale set apart from hidden/heads, so a wrong one shows;
    # windows of 3 and caps small enough to bite on 7 + 8 tokens.
    "gemma": (transformers.GemmaConfig, dict(COMMON, head_dim=16, rope_theta=1e4)),
    "gemma2": (transformers.Gemma2Config, dict(
        COMMON, head_dim=16, num_hidden_layers=3, query_pre_attn_scalar=12, sliding_window=3,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, rope_theta=1e4,
        tie_word_embeddings=False)),  # (the lm_head row; greedy runs that do not repeat)
    "gemma3": (transformers.Gemma3TextConfig, dict(
        COMMON, head_dim=16, num_hidden_layers=3, query_pre_attn_scalar=24, sliding_window=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        tie_word_embeddings=False,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e3}})),
    # A multimodal Gemma 3 (Gemma3ForConditionalGeneration: the gemma3 text model beside a
    # one-layer SigLIP tower): mio_jax reads its language model; the logits of text input.
    "gemma3_mm": (transformers.Gemma3Config, dict(
        text_config=dict(
            {k: v for k, v in COMMON.items() if k not in ("bos_token_id", "eos_token_id",
                                                          "pad_token_id")},
            head_dim=16, num_hidden_layers=3, query_pre_attn_scalar=24, sliding_window=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e3}}),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=95, boi_token_index=93, eoi_token_index=94,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    # Mixtures of experts: 6 and 4 experts, 2 per token (each token's pair differs, so a
    # wrong routing shows); Qwen3-MoE renormalises the chosen probabilities by its flag,
    # Mixtral always.
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(
        COMMON, head_dim=16, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
        norm_topk_prob=True, rope_theta=1e6)),
    "mixtral": (transformers.MixtralConfig, dict(
        COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
        rope_theta=1e6)),
}


# Gemma stores its norms as offsets from 1 and scales the (tied) embeddings by sqrt(hidden):
# norms drawn around 0 and embeddings with std hidden**-0.5 keep its activations and logits
# at the Llama cases' scale (unit embeddings would give logits of +-60, every cap saturated
# and greedy runs that repeat the last token).
GEMMA_WEIGHTS = {"norm_center": 0.0, "embed_std": COMMON["hidden_size"] ** -0.5}
WEIGHTS = {"gemma": GEMMA_WEIGHTS, "gemma2": GEMMA_WEIGHTS, "gemma3": GEMMA_WEIGHTS,
           "gemma3_mm": GEMMA_WEIGHTS}


def tensor_value(name, shape, seed=SEED, norm_center=1.0, embed_std=1.0):
    """Deterministic float32 weights for one HF tensor name (also used by the tests)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    noise = rng.standard_normal(shape).astype(np.float32)
    if name.endswith("norm.weight"):
        return (norm_center + 0.1 * noise).astype(np.float32)
    if name.endswith(".bias"):
        return (0.1 * noise).astype(np.float32)
    if name.endswith("embed_tokens.weight"):
        return noise if embed_std == 1.0 else (embed_std * noise).astype(np.float32)
    return (noise / np.sqrt(shape[-1])).astype(np.float32)


def build(case):
    cls, kwargs = CASES[case]
    config = cls(**kwargs)
    cls = (transformers.Gemma3ForConditionalGeneration if isinstance(config, transformers.Gemma3Config)
           else transformers.AutoModelForCausalLM)
    model = cls.from_config(config, attn_implementation="eager") if cls is not \
        transformers.Gemma3ForConditionalGeneration else cls(config)
    model.eval()
    tmp = tempfile.mkdtemp()
    model.save_pretrained(tmp)
    tensors = {}
    with safe_open(os.path.join(tmp, "model.safetensors"), "pt") as f:
        for name in sorted(f.keys()):
            tensors[name] = list(f.get_slice(name).get_shape())
    state = {n: torch.from_numpy(tensor_value(n, tuple(s), **WEIGHTS.get(case, {})))
             for n, s in tensors.items()}
    if set(state) <= set(model.state_dict()):
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected, unexpected
        assert all(m == "lm_head.weight" for m in missing), missing  # tied to embed_tokens
        model.tie_weights()
    else:  # saved under other names than the module's (MoE experts, fused in memory)
        save_file({n: t.contiguous() for n, t in state.items()},
                  os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        model, info = type(model).from_pretrained(
            tmp, output_loading_info=True, attn_implementation="eager")
        assert not any(info.values()), info
        model.eval()
    with open(os.path.join(tmp, "config.json")) as f:
        hf_config = json.load(f)
    return model, hf_config, tensors


def run(model):
    ids = torch.tensor(INPUT_IDS)
    mask = torch.tensor(ATTENTION_MASK)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS,
                             eos_token_id=None, pad_token_id=0)
    sel = logits[:, LOGIT_POSITIONS, :].numpy()
    return sel, gen[:, ids.shape[1]:].tolist()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--check-export")
    parser.add_argument("--case")
    parser.add_argument("--cases", help="comma-separated cases to (re)compute; the others "
                        "are kept from the stored file")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.check_export:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            args.check_export, output_loading_info=True, attn_implementation="eager")
        model.eval()
        sel, gen = run(model)
        with open(OUT) as f:
            golden = json.load(f)["cases"][args.case]
        diff = float(np.abs(sel - np.asarray(golden["logits"])).max())
        print(json.dumps({"loading_info": {k: sorted(v) if isinstance(v, (set, list)) else str(v)
                                           for k, v in info.items()},
                          "max_abs_logit_diff_vs_golden": diff,
                          "greedy_equal": gen == golden["greedy_ids"]}))
        return
    cases, todo = {}, list(CASES)
    if args.cases:
        todo = args.cases.split(",")
        with open(OUT) as f:
            stored = json.load(f)
        cases = {c: v for c, v in stored["cases"].items() if c not in todo}
    for case in todo:
        model, hf_config, tensors = build(case)
        sel, gen = run(model)
        cases[case] = {
            "config": hf_config,
            "tensors": tensors,
            "logits": np.round(sel.astype(np.float64), 6).tolist(),
            "greedy_ids": gen,
            "weights": WEIGHTS.get(case, {}),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }
        print(case, "logit range", float(sel.min()), float(sel.max()), "greedy", gen)
    cases = {c: cases[c] for c in CASES}
    out = {"generator": "scripts/golden_model_logits.py", "seed": SEED, "input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK,
           "logit_positions": LOGIT_POSITIONS, "max_new_tokens": MAX_NEW_TOKENS, "cases": cases}
    with open(OUT, "w") as f:
        json.dump(out, f, separators=(",", ":"))
    print("wrote", os.path.abspath(OUT), os.path.getsize(OUT), "bytes")


if __name__ == "__main__":
    main()
