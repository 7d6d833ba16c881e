"""Paper-scale runs: MIO or DPO on a 7-8B model with UltraFeedback-style pairs.

``get_config("MODEL,LOSS,HARDWARE")`` with
  MODEL    llama3_8b | mistral_7b | qwen2.5_7b  (an HF folder: config.json + safetensors)
  LOSS     mio | dpo                            (dpo at beta_MIO / 2, the gradient match)
  HARDWARE v5p-64 | v4-64 | h100x8              (mesh and batch layout; "runlocal" appended
                                                 shrinks the run to a few steps for a smoke test)

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
"""

from mio_jax import config as mio_config

MODELS = {
    "llama3_8b": "/data/models/Meta-Llama-3-8B-Instruct",
    "mistral_7b": "/data/models/Mistral-7B-Instruct-v0.2",
    "qwen2.5_7b": "/data/models/Qwen2.5-7B-Instruct",
}
# mesh (data, fsdp, tensor), global pairs per step, micro-batches per step, remat policy.
# Sized with benchmarks/aot_memory.py (docs/benchmarks/README.md section 3) for 2048-token pairs
# of 7-8B models: v5p (95 GB) and H100 (80 GB) fit 2 and 1 pairs per device per
# micro-batch with dots_with_no_batch_dims_saveable; v4 (32 GB) needs full remat at 1.
# H100s run cuDNN's fused attention (the memory table was compiled with the written-out
# attention, which stores more, so it is an upper bound for them).
HARDWARE = {
    "v5p-64": dict(mesh=(1, 32, 1), batch_size=128, grad_accum_steps=2,
                   remat="dots_with_no_batch_dims_saveable", attention="xla"),
    "v4-64": dict(mesh=(1, 32, 1), batch_size=128, grad_accum_steps=4, remat="full",
                  attention="xla"),
    "v6e-32": dict(mesh=(1, 32, 1), batch_size=128, grad_accum_steps=4, remat="full",
                   attention="xla"),  # 32 GB per chip, like v4
    "h100x8": dict(mesh=(1, 8, 1), batch_size=128, grad_accum_steps=16,
                   remat="dots_with_no_batch_dims_saveable", attention="cudnn"),
}
BETA_MIO = 0.1


def get_config(arg="llama3_8b,mio,v5p-64"):
    """Returns the paper-scale config for ``"MODEL,LOSS,HARDWARE[,runlocal]"``."""
    parts = arg.split(",")
    model, loss, hw = parts[:3]
    runlocal = "runlocal" in parts[3:]
    if model not in MODELS or loss not in ("mio", "dpo") or hw not in HARDWARE:
        raise ValueError(f"configs/paper.py: bad arg {arg!r}; expected MODEL,LOSS,HARDWARE with "
                         f"MODEL in {sorted(MODELS)}, LOSS in mio|dpo, HARDWARE in "
                         f"{sorted(HARDWARE)}")
    h = HARDWARE[hw]
    c = mio_config.base_config()
    c.seed = 0
    c.model.path = MODELS[model]
    c.model.dtype = "bfloat16"           # compute
    c.model.param_dtype = "float32"      # master weights and Adam state
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
    c.reference.mode = "precomputed"     # no reference weights in memory during training
    c.reference.batch_size = 256

    c.checkpoint.every_steps = 100
    c.checkpoint.keep = 3
    c.log.every_steps = 10
    c.log.peak_flops_per_device = 0.0    # from the chip table
    c.eval.every_steps = 100
    c.eval.batch_size = 64
    c.eval.max_batches = 0

    if runlocal:
        c.train.epochs = 0.0
        c.train.steps = 4
        c.optim.warmup_steps = 1
        c.data.max_rows = 512
        c.eval.max_batches = 2
    return c
