"""Paper-scale runs: MIO or DPO on a 7-8B model with UltraFeedback-style pairs.

``get_config("MODEL,LOSS,HARDWARE[,TUNING][,runlocal]")`` with
  MODEL    llama3_8b | mistral_7b | qwen2.5_7b | gemma3_12b | gemma3_27b | qwen3_30b_a3b
           (an HF folder: config.json + safetensors; Gemma 3: the text model's folder,
           Gemma3ForCausalLM, e.g. the language model of google/gemma-3-27b-it;
           Qwen3-30B-A3B: 128 experts, 8 a token, split over an expert mesh axis of
           EXPERT_PARALLEL devices, the router's auxiliary losses off)
  LOSS     mio | dpo                            (dpo at beta_MIO / 2, the gradient match)
  HARDWARE v5p-64 | v4-64 | v6e-32 | h100x8      full fine-tuning, 128 pairs x 2048 tokens
           h100x1 | h200x1 | gpu24gb | v5p-8    LoRA layouts, 8 pairs x 1024 tokens
  TUNING   (none: full fine-tuning) | lora (adapters on a bfloat16 base) | qlora (adapters
           on an NF4 base); ``MODES`` lists what each layout offers, the rest is refused
  runlocal shrinks the same run to a few steps for a smoke test

LoRA follows the usual LoRA-DPO recipe: rank 16, alpha 32, every linear weight
(q/k/v/o/gate/up/down), dropout 0.05, a learning rate 10x the full fine-tune's (5e-6).
The reference is the base with the adapters off (``reference.mode="frozen"`` with LoRA:
computed in the same step from the same weights, no second copy). The base is kept in
the bfloat16 compute dtype (lora) or as NF4 blocks of 64 (qlora).

Data: a JSONL / parquet / saved-dataset of explicit or conversational pairs
(UltraFeedback binarized-style: prompt, chosen, rejected); set ``data.train_path`` and
``data.eval_path``. Model weights: set ``model.path`` (defaults below are placeholders
under /data, which must exist on every worker).

Launch commands (environment only in the scripts; hyper-parameters live here):

  # TPU v5p-64 (32 chips, 4 hosts), MIO on Llama-3-8B:
  launch/tpu_pod.sh my-v5p v5p-64 us-east5-a \\
      --config=configs/paper.py:llama3_8b,mio,v5p-64 --workdir=/mnt/shared/mio_llama3_8b
  # TPU v4-64, DPO on Mistral-7B:
  launch/tpu_pod.sh my-v4 v4-64 us-central2-b \\
      --config=configs/paper.py:mistral_7b,dpo,v4-64 --workdir=/mnt/shared/dpo_mistral_7b
  # 8 x H100 (one node), MIO on Qwen2.5-7B:
  sbatch --nodes=1 --gpus-per-node=8 launch/slurm_gpu.sh \\
      --config=configs/paper.py:qwen2.5_7b,mio,h100x8 --workdir=/checkpoints/mio_qwen7b
  # LoRA on one H100 80 GB (or h200x1), MIO on Llama-3-8B:
  launch/local.sh --config=configs/paper.py:llama3_8b,mio,h100x1,lora \\
      --workdir=/checkpoints/mio_llama3_8b_lora
  # QLoRA on one 24 GB GPU (RTX 4090 / A10 / L4 class): the step peaks near 19 GB, more
  # than the 75% of the device JAX takes by default
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 launch/local.sh \\
      --config=configs/paper.py:llama3_8b,mio,gpu24gb,qlora --workdir=/checkpoints/mio_qlora
  # LoRA on a TPU v5p-8 (4 chips, one host):
  launch/tpu_pod.sh my-v5p8 v5p-8 us-east5-a \\
      --config=configs/paper.py:llama3_8b,mio,v5p-8,lora --workdir=/mnt/shared/mio_lora_v5p8
"""

from mio_jax import config as mio_config

MODELS = {
    "llama3_8b": "/data/models/Meta-Llama-3-8B-Instruct",
    "mistral_7b": "/data/models/Mistral-7B-Instruct-v0.2",
    "qwen2.5_7b": "/data/models/Qwen2.5-7B-Instruct",
    "gemma3_12b": "/data/models/gemma-3-12b-it-text",
    "gemma3_27b": "/data/models/gemma-3-27b-it-text",
    "qwen3_30b_a3b": "/data/models/Qwen3-30B-A3B",
}
# Mixtures of experts: the experts split over an "expert" mesh axis of this many devices
# (the rest of the layout's fsdp devices stay fsdp; the batch is split over both).
MIXTURES = ("qwen3_30b_a3b",)
EXPERT_PARALLEL = 8
# The larger models' full fine-tuning, sized by the TPU compiler's own memory analysis
# (docs/benchmarks/README.md section 3c): what changes from the hardware layout, and the
# layouts they do not fit (with the measured peak per chip).
MODEL_LAYOUTS = {
    ("gemma3_27b", "v5p-64"): dict(grad_accum_steps=4),  # 75.3 GB of 95 (2 pairs: 122.4)
}
DOES_NOT_FIT = {
    ("gemma3_27b", "v6e-32"): "33.1 GB a chip of 32 at 1 pair a micro-batch with full remat",
    ("gemma3_27b", "v4-64"): "as on v6e-32 (32 GB chips; 33.1 GB a chip measured there)",
}
# mesh (data, fsdp, tensor), global pairs per step, micro-batches per step, remat policy,
# attention, and the memory of one device (GB) the layout is sized for.
# Full fine-tuning, sized with benchmarks/aot_memory.py (docs/benchmarks/README.md section 3)
# for 2048-token pairs of 7-8B models: v5p (95 GB) and H100 (80 GB) fit 2 and 1 pairs per
# device per micro-batch with dots_with_no_batch_dims_saveable; v4 (32 GB) needs full remat
# at 1. H100s run cuDNN's fused attention (the memory table was compiled with the
# written-out attention, which stores more, so it is an upper bound for them).
HARDWARE = {
    "v5p-64": dict(mesh=(1, 32, 1), batch_size=128, grad_accum_steps=2,
                   remat="dots_with_no_batch_dims_saveable", attention="xla", device_gb=95.0),
    "v4-64": dict(mesh=(1, 32, 1), batch_size=128, grad_accum_steps=4, remat="full",
                  attention="xla", device_gb=32.0),
    "v6e-32": dict(mesh=(1, 32, 1), batch_size=128, grad_accum_steps=4, remat="full",
                   attention="xla", device_gb=32.0),  # 32 GB per chip, like v4
    "h100x8": dict(mesh=(1, 8, 1), batch_size=128, grad_accum_steps=16,
                   remat="dots_with_no_batch_dims_saveable", attention="cudnn",
                   device_gb=80.0),
    # LoRA layouts: 8 pairs x 1024 tokens a step (benchmarks/aot_memory.py --modes=lora,qlora,
    # XLA:CPU stand-in for the GPUs, libtpu for v5p-8; Llama-3-8B peaks per device). At one
    # micro-batch of 8 pairs with dots_with_no_batch_dims_saveable the step needs ~121 GB,
    # so the single GPUs accumulate: h100x1 4 micro-batches of 2 pairs (43.5 GB; 2 of 4
    # pairs would be 69 GB, over the 75% of 80 GB JAX takes by default), h200x1 2 of 4
    # (69 GB); the 24 GB GPU recomputes whole layers, 8 micro-batches of 1 pair (QLoRA
    # 19.0 GB, so set XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 there: JAX's default 0.75 is 18 GB);
    # v5p-8 runs 2 pairs a chip in one micro-batch (31 GB of 95).
    "h100x1": dict(mesh=(1, 1, 1), batch_size=8, grad_accum_steps=4,
                   remat="dots_with_no_batch_dims_saveable", attention="cudnn",
                   device_gb=80.0),
    "h200x1": dict(mesh=(1, 1, 1), batch_size=8, grad_accum_steps=2,
                   remat="dots_with_no_batch_dims_saveable", attention="cudnn",
                   device_gb=141.0),
    "gpu24gb": dict(mesh=(1, 1, 1), batch_size=8, grad_accum_steps=8, remat="full",
                    attention="cudnn", device_gb=24.0),
    "v5p-8": dict(mesh=(1, 4, 1), batch_size=8, grad_accum_steps=1,
                  remat="dots_with_no_batch_dims_saveable", attention="xla", device_gb=95.0),
}
# What each layout offers: tuning mode -> changes to its HARDWARE entry for that mode.
MODES = {
    "v5p-64": {"full": {}},
    "v4-64": {"full": {}},
    "v6e-32": {"full": {}},
    "h100x8": {"full": {}},
    "h100x1": {"lora": {}, "qlora": {}},
    "h200x1": {"lora": {}, "qlora": {}},
    "gpu24gb": {"qlora": {}},
    "v5p-8": {"lora": {}, "qlora": {}},
}
TUNINGS = ("lora", "qlora")
BETA_MIO = 0.1


def _refusal(hw: str, mode: str) -> str:
    """Why ``mode`` is not offered on ``hw`` (for the ValueError)."""
    where = " | ".join(h for h, modes in MODES.items() if mode in modes)
    if mode == "full":
        return ("full fine-tuning keeps float32 weights, gradients and two Adam moments (16 "
                "bytes a parameter, ~128 GB for Llama-3-8B) and is laid out for 128 pairs x "
                f"2048 tokens over several devices: use {where}, or add ',lora' / ',qlora'")
    if hw == "gpu24gb":
        return ("the bfloat16 base alone is ~16 GB for Llama-3-8B: even at 1 pair a "
                "micro-batch with full remat the step peaks at ~21 GB of the 24, too close "
                "to the limit to ship; use ',qlora' (NF4 base, ~6 GB; ~19 GB peak)")
    return (f"{mode} is laid out for 8 pairs x 1024 tokens a step on one host ({where}); "
            f"8 pairs do not spread over {hw}'s devices")


def _parse(arg: str):
    parts = [p.strip() for p in arg.split(",")]
    model, loss, hw = (parts + ["", "", ""])[:3]
    extra = parts[3:]
    runlocal = "runlocal" in extra
    tunings = [p for p in extra if p in TUNINGS]
    unknown = [p for p in extra if p not in TUNINGS and p != "runlocal"]
    if (model not in MODELS or loss not in ("mio", "dpo") or hw not in HARDWARE or unknown
            or len(tunings) > 1):
        raise ValueError(f"configs/paper.py: bad arg {arg!r}; expected "
                         f"MODEL,LOSS,HARDWARE[,lora|qlora][,runlocal] with MODEL in "
                         f"{sorted(MODELS)}, LOSS in mio|dpo, HARDWARE in {sorted(HARDWARE)}")
    mode = tunings[0] if tunings else "full"
    if mode not in MODES[hw]:
        raise ValueError(f"configs/paper.py: {arg!r} does not fit: {hw} offers "
                         f"{'|'.join(MODES[hw])} only ({hw}: {HARDWARE[hw]['device_gb']:.0f} GB "
                         f"a device); {_refusal(hw, mode)}")
    return model, loss, hw, mode, runlocal


def get_config(arg="llama3_8b,mio,v5p-64"):
    """Returns the paper-scale config for ``"MODEL,LOSS,HARDWARE[,lora|qlora][,runlocal]"``.

    Raises:
      ValueError: an unknown part, or a tuning mode the hardware layout does not fit.
    """
    model, loss, hw, mode, runlocal = _parse(arg)
    if mode == "full" and (model, hw) in DOES_NOT_FIT:
        raise ValueError(f"configs/paper.py: {arg!r} does not fit: full fine-tuning of {model} "
                         f"on {hw} needs {DOES_NOT_FIT[model, hw]}; use v5p-64, or add "
                         "',lora' on a layout that offers it")
    h = dict(HARDWARE[hw], **MODES[hw][mode])
    if mode == "full":
        h.update(MODEL_LAYOUTS.get((model, hw), {}))
    c = mio_config.base_config()
    c.seed = 0
    c.model.path = MODELS[model]
    c.model.dtype = "bfloat16"           # compute
    c.model.param_dtype = "float32"      # master weights (adapters with LoRA) and Adam state
    c.model.remat_policy = h["remat"]
    c.model.attention = h["attention"]
    c.model.scan_layers = True
    c.model.logps_chunk_size = 8192

    c.data.train_path = "/data/ultrafeedback_binarized/train_prefs.parquet"
    c.data.eval_path = "/data/ultrafeedback_binarized/test_prefs.parquet"
    c.data.format = "auto"
    c.data.max_length = 2048
    c.data.max_prompt_length = 1024
    c.data.on_bad_row = "skip"
    c.data.bucketing = True
    c.data.pad_to_multiple_of = 128
    c.data.num_epochs = 0

    c.loss.name = loss
    c.loss.beta = BETA_MIO if loss == "mio" else BETA_MIO / 2

    c.train.epochs = 1.0
    c.train.batch_size = h["batch_size"]
    c.train.grad_accum_steps = h["grad_accum_steps"]

    c.optim.learning_rate = 5e-7
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.0
    c.optim.max_grad_norm = 1.0

    c.mesh.shape = h["mesh"]
    c.mesh.axes = ("data", "fsdp", "tensor")
    if model in MIXTURES:
        data, fsdp, tensor = h["mesh"]
        ep = min(EXPERT_PARALLEL, fsdp)
        c.mesh.shape = (data, fsdp // ep, tensor, ep)
        c.mesh.axes = ("data", "fsdp", "tensor", "expert")
    c.reference.mode = "precomputed"     # no reference weights in memory during training
    c.reference.batch_size = 256

    c.checkpoint.every_steps = 100
    c.checkpoint.keep = 3
    c.log.every_steps = 10
    c.log.peak_flops_per_device = 0.0    # from the chip table
    c.eval.every_steps = 100
    c.eval.batch_size = 64
    c.eval.max_batches = 0

    if mode in TUNINGS:
        c.model.lora.enabled = True
        c.model.lora.rank = 16
        c.model.lora.alpha = 32.0
        c.model.lora.target_modules = "all-linear"
        c.model.lora.dropout = 0.05
        c.model.lora.quantize = "nf4" if mode == "qlora" else "none"
        # The reference is the base with the adapters off: no copy, no precompute pass.
        c.reference.mode = "frozen"
        c.reference.batch_size = 32
        c.optim.learning_rate = 5e-6     # LoRA-DPO: ~10x the full fine-tune's rate
        c.data.max_length = 1024
        c.data.max_prompt_length = 512
        c.eval.batch_size = h["batch_size"]  # an eval batch no bigger than a train step's

    if runlocal:
        c.train.epochs = 0.0
        c.train.steps = 4
        c.optim.warmup_steps = 1
        c.data.max_rows = 512
        c.eval.max_batches = 2
    return c
