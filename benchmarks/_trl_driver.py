"""TRL side of benchmarks/vs_trl.py; runs with the throwaway TRL env's python, never mio_jax's.

Builds TRL's ``DPOTrainer`` on the converted model, collates the given pairs with TRL's
own data collator, and then serves a line protocol on stdin/stdout so that the parent
can alternate TRL and mio_jax steps:

  "step\\n"  -> one optimizer step (``trainer.training_step`` = forward + backward,
               then ``optimizer.step()`` and ``zero_grad``) on the fixed batch;
               replies ``{"t": seconds, "loss": float, "margins": float}``
  "quit\\n"  -> replies ``{"peak_rss_bytes": ...}`` and exits.

Usage: python _trl_driver.py SPEC.json   (SPEC: model_dir, pairs [{prompt_ids, chosen_ids,
rejected_ids}], loss_type, beta, lr, precompute, threads)
"""

import json
import os
import resource
import sys
import tempfile
import time


def main():
    spec = json.load(open(sys.argv[1], encoding="utf-8"))
    import torch

    torch.set_num_threads(int(spec.get("threads") or os.cpu_count()))
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out = tempfile.mkdtemp(prefix="trl_bench_")
    args = DPOConfig(
        output_dir=out, loss_type=[spec["loss_type"]], beta=spec["beta"],
        learning_rate=spec["lr"], weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, max_grad_norm=0.0, lr_scheduler_type="constant", warmup_steps=0,
        per_device_train_batch_size=len(spec["pairs"]), precompute_ref_log_probs=spec["precompute"],
        max_length=None, report_to=[], logging_steps=1000, save_strategy="no",
        use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0, seed=0,
        # DPOConfig defaults to True; the caller matches mio_jax's remat setting
        gradient_checkpointing=bool(spec.get("gradient_checkpointing", False)))
    # A tiny text data set only satisfies the constructor (and the precompute pass);
    # the timed batch is built from the given token ids with TRL's own collator.
    dummy = Dataset.from_list([{"prompt": "Hi", "chosen": " yes", "rejected": " no"}] * 2)
    trainer = DPOTrainer(model=model, args=args, train_dataset=dummy, processing_class=tok)
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which we bypass
    examples = [dict(p) for p in spec["pairs"]]
    batch = trainer.data_collator(examples)
    ref = None
    if spec["precompute"]:
        with torch.no_grad():
            rc, rr = trainer.compute_ref_log_probs(trainer.model, batch)
        for e, c, r in zip(examples, rc.tolist(), rr.tolist()):
            e["ref_chosen_logps"], e["ref_rejected_logps"] = c, r
        batch = trainer.data_collator(examples)
        ref = [rc.tolist(), rr.tolist()]
    shape = list(batch["input_ids"].shape)
    print(json.dumps({"ready": True, "ref_logps": ref, "batch_shape": shape}), flush=True)
    model = trainer.model
    opt = trainer.optimizer
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            t0 = time.perf_counter()
            loss = trainer.training_step(model, batch)
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            margins = trainer._metrics["train"]["rewards/margins"][-1]
            print(json.dumps({"t": dt, "loss": float(loss), "margins": float(margins)}), flush=True)
        elif cmd == "quit":
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            print(json.dumps({"peak_rss_bytes": rss}), flush=True)
            return


if __name__ == "__main__":
    main()
