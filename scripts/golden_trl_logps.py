"""Writes tests/golden_trl_logps.json: per-token and per-sequence log-probs, WPO
weights and LD-DPO log-probs computed by TRL 1.16's own DPOTrainer code.

Run with the throwaway torch env (never imported by the package or tests):

    /work/trl_env/bin/python scripts/golden_trl_logps.py

How the numbers are extracted from TRL (no TRL formula is re-implemented here):

* A tiny random ``LlamaForCausalLM`` (vocab 101, width 16, one layer, untied
  ``lm_head``; seed 0) and a real ``DPOTrainer`` around it are built, with a
  one-word-per-token tokenizer made with ``tokenizers`` and a two-row dataset
  (the trainer requires both; the golden batch below is built by hand).
* The golden batch is TRL's layout: rows ``[chosen_0..chosen_{B-1},
  rejected_0..rejected_{B-1}]`` of ``input_ids``, ``attention_mask`` and
  ``completion_mask`` (right padding, varied prompt and completion lengths, one
  completion of a single token).
* ``model(..., labels=..., fused_lm_head=True)`` (the fused head DPOTrainer
  installs) gives TRL's per-token ``log_probs`` and ``log_sum_sq_probs``.
* ``trainer.compute_ref_log_probs(model, batch)`` gives TRL's per-sequence
  log-probs, with ``trainer.ld_alpha = None`` (plain sums) and ``= LD_ALPHA``
  (LD-DPO).
* WPO weights: ``trainer._compute_loss`` on each pair alone (batch of one pair,
  ``loss_type="sigmoid"``) with ``use_weighting`` True and False; the loss is
  ``per_sequence_loss * chosen_weight * rejected_weight`` in the first case and
  ``per_sequence_loss`` in the second, so their ratio is TRL's pair weight.

The JSON stores what the JAX side needs to recompute everything: the final
hidden states (after the final norm, shifted so position t scores target t),
the ``lm_head`` matrix ``[V, D]``, the targets and completion masks. TRL
computes in float32, so the golden values carry float32 rounding. ``bf16=False``
matters: DPOConfig defaults to ``bf16=True``, under which
``compute_ref_log_probs`` runs in CPU bfloat16 autocast (errors of ~3e-4).
"""

import json
import os
import tempfile

import numpy as np
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer

VOCAB, WIDTH, SEQ = 101, 16, 12
LD_ALPHA = 0.5
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "golden_trl_logps.json")

# (prompt length, chosen completion length, rejected completion length) per pair;
# every row is SEQ tokens after right padding.
PAIRS = [(3, 5, 8), (5, 6, 1), (2, 9, 9)]


def build_tokenizer():
    words = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="w0", eos_token="w2", bos_token="w1", unk_token="w3"
    )


def build_batch(rng):
    chosen, rejected = [], []
    for prompt_len, chosen_len, rejected_len in PAIRS:
        prompt = rng.integers(4, VOCAB, prompt_len)
        for length, rows in ((chosen_len, chosen), (rejected_len, rejected)):
            ids = np.zeros(SEQ, np.int64)
            comp = np.zeros(SEQ, np.int64)
            att = np.zeros(SEQ, np.int64)
            total = prompt_len + length
            ids[:prompt_len] = prompt
            ids[prompt_len:total] = rng.integers(4, VOCAB, length)
            comp[prompt_len:total] = 1
            att[:total] = 1
            rows.append((ids, att, comp))
    rows = chosen + rejected
    stack = lambda k: torch.tensor(np.stack([r[k] for r in rows]))  # noqa: E731
    return {"input_ids": stack(0), "attention_mask": stack(1), "completion_mask": stack(2)}


def main():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config).float()
    # Larger logits than the default init so probabilities are far from uniform.
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)
    ref_model = LlamaForCausalLM(config).float()
    ref_model.load_state_dict(model.state_dict())

    dataset = Dataset.from_dict(
        {"prompt": ["w5 w6", "w7"], "chosen": [" w8 w9", " w10"], "rejected": [" w11", " w12 w13"]}
    )
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp, report_to="none", use_cpu=True, loss_type=["sigmoid"], beta=0.1,
            use_weighting=True, per_device_train_batch_size=2, logging_steps=1, bf16=False,
        )
        trainer = DPOTrainer(
            model=model, ref_model=ref_model, args=args, train_dataset=dataset,
            processing_class=build_tokenizer(),
        )
        model = trainer.model
        batch = build_batch(rng)
        n_pairs = len(PAIRS)

        with torch.no_grad():
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            fused = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                labels=labels, fused_lm_head=True, use_cache=False,
            )
            hidden = model.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).last_hidden_state[:, :-1]

            trainer.ld_alpha = None
            plain_c, plain_r = trainer.compute_ref_log_probs(model, batch)
            trainer.ld_alpha = LD_ALPHA
            ld_c, ld_r = trainer.compute_ref_log_probs(model, batch)
            trainer.ld_alpha = None

            weights = []
            for i in range(n_pairs):
                rows = [i, n_pairs + i]
                pair = {k: v[rows] for k, v in batch.items()}
                trainer.use_weighting = True
                weighted = trainer._compute_loss(model, pair, False)
                trainer.use_weighting = False
                unweighted = trainer._compute_loss(model, pair, False)
                weights.append((weighted / unweighted).item())

    as_list = lambda t: t.detach().cpu().numpy().tolist()  # noqa: E731
    golden = {
        "source": "TRL 1.16.0 DPOTrainer (scripts/golden_trl_logps.py)",
        "layout": "rows are [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]",
        "ld_alpha": LD_ALPHA,
        "hidden_ntd": as_list(hidden),
        "out_vd": as_list(model.lm_head.weight),
        "targets_nt": as_list(batch["input_ids"][:, 1:]),
        "mask_nt": as_list(batch["completion_mask"][:, 1:]),
        "token_logps_nt": as_list(fused.log_probs),
        "token_log_sum_sq_probs_nt": as_list(fused.log_sum_sq_probs),
        "sequence_logps_chosen": as_list(plain_c),
        "sequence_logps_rejected": as_list(plain_r),
        "ld_logps_chosen": as_list(ld_c),
        "ld_logps_rejected": as_list(ld_r),
        "wpo_pair_weights": weights,
    }
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(golden, f)
        f.write("\n")
    print(f"wrote {os.path.normpath(OUT)}: WPO weights {weights}")
    print("LD chosen", as_list(ld_c), "rejected", as_list(ld_r))


if __name__ == "__main__":
    main()
