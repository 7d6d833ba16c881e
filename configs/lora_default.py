"""MIO with LoRA on the embedded SmolLM2-135M: the same data and schedule as configs/default.py,
adapters on every linear weight, the base as the reference (one model in memory).

  python -m mio_jax.main --config=configs/lora_default.py --workdir=/tmp/mio_lora
  python -m mio_jax.main --config=configs/lora_default.py:gguf --workdir=/tmp/mio_qlora

``get_config(arg)``: ``arg`` "nf4", "int8" or "gguf" stores the frozen base quantized
(QLoRA; "gguf" keeps the file's Q4_1 blocks as they are); "runlocal" (alone or after a comma,
"gguf,runlocal") shrinks the run to a smoke test. docs/lora.md has the details.
"""

import os

from mio_jax import config as mio_config
from mio_jax.models.lora import BASE_STORAGES

default = mio_config.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                              "default.py"))


def get_config(arg=None):
    parts = [p for p in (arg or "").split(",") if p]
    stored = [q for q in BASE_STORAGES if q != "none"]
    quantize = next((p for p in parts if p in stored), "none")
    unknown = [p for p in parts if p not in stored + ["runlocal"]]
    if unknown:
        raise ValueError(f"configs/lora_default.py: unknown arg part(s) {unknown}; "
                         "expected nf4 | int8 | gguf and/or runlocal")
    c = default.get_config("runlocal" if "runlocal" in parts else None)
    c.model.lora.enabled = True
    c.model.lora.rank = 16
    c.model.lora.alpha = 32.0
    c.model.lora.target_modules = "all-linear"
    c.model.lora.quantize = quantize
    # Adapters start at a zero update and move slowly at full fine-tuning rates: LoRA-DPO
    # recipes use about 10x the full rate.
    c.optim.learning_rate = 5e-5
    return c
