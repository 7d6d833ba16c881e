"""TRL side of benchmarks/vs_trl.py; runs with the throwaway TRL env's python, never mio_jax's.

Builds TRL's ``DPOTrainer`` on the converted model, collates the given pairs with TRL's
own data collator, and then serves a line protocol on stdin/stdout so that the parent
can alternate TRL and mio_jax steps. With ``adapter_dir`` (a PEFT LoRA folder) the
trainer trains a LoRA adapter the way TRL + PEFT users set one up: ``peft_config`` = the
folder's ``LoraConfig`` and ``ref_model=None``, so the reference is the model with its
adapter disabled; the folder's tensors are then loaded into that adapter, so training
starts from exactly the adapter the mio_jax side starts from. (Passing
``PeftModel.from_pretrained(...)`` as the model instead would make TRL >= 1.16 with
peft >= 0.20 copy the adapter into a second, "ref" adapter and run the reference
forward through it: the same values while B = 0, but not the adapter-off base.)

On start it prints ``{"ready": true, "ref_logps": ..., "batch_shape": ..., "trainable":
values the optimizer updates, "reference": how the reference is computed}``.

  "step\\n"  -> one optimizer step (``trainer.training_step`` = forward + backward,
               then ``optimizer.step()`` and ``zero_grad``) on the fixed batch;
               replies ``{"t": seconds, "loss": float, "margins": float}``
  "quit\\n"  -> replies ``{"peak_rss_bytes": ...}`` and exits.

Usage: python _trl_driver.py SPEC.json   (SPEC: model_dir, pairs [{prompt_ids, chosen_ids,
rejected_ids}], loss_type, beta, lr, precompute, threads, gradient_checkpointing,
adapter_dir: a PEFT LoRA folder or null)
"""

import json
import os
import resource
import sys
import tempfile
import time


def load_adapter_values(trainer, folder: str) -> str:
    """Loads the folder's LoRA tensors into the trainer's adapter ("default"), checking
    that every tensor lands and that every trainable value came from the file; returns
    how the reference is computed."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    model = trainer.model
    values = load_file(os.path.join(folder, "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, values)
    if result.unexpected_keys:
        raise RuntimeError(f"adapter tensors not in the model: {result.unexpected_keys[:4]}")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if len(trainable) != len(values):
        raise RuntimeError(f"{len(trainable)} trainable tensors but {len(values)} in {folder}")
    for name, value in values.items():  # e.g. ...q_proj.lora_A.weight -> ...lora_A.default.weight
        key = name.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        if not torch.equal(trainable[key].detach(), value.to(trainable[key].dtype)):
            raise RuntimeError(f"{key} does not hold the value of {name} from {folder}")
    if trainer.ref_model is not None or "ref" in model.peft_config:
        raise RuntimeError("TRL built a separate reference; expected the adapter-disabled base")
    return "the base (adapter disabled)"


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
    adapter_dir = spec.get("adapter_dir")
    peft_config = None
    if adapter_dir:
        from peft import LoraConfig

        peft_config = LoraConfig.from_pretrained(adapter_dir)
        peft_config.inference_mode = False  # the folder was written for inference
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=dummy,
                         processing_class=tok, peft_config=peft_config)
    if adapter_dir:
        reference = load_adapter_values(trainer, adapter_dir)
        reference = f"precomputed from {reference}" if spec["precompute"] else reference
    else:
        reference = "precomputed" if spec["precompute"] else "a frozen copy (ref_model)"
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    trainable = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
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
    print(json.dumps({"ready": True, "ref_logps": ref, "batch_shape": shape,
                      "trainable": trainable, "reference": reference}), flush=True)
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
