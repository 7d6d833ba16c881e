"""Stored bytes of SmolLM2-135M's frozen base under each LoRA base storage (issue 15).

Loads the embedded GGUF as the trainer does with ``model.lora.enabled`` (rank 16, every
linear module) and ``model.lora.quantize`` = none | int8 | nf4 | gguf, and prints the bytes
of the frozen base (everything but the adapters: quantized linear weights with their
scales, the float embedding and norms) per base parameter, the bytes per element of the
quantized linear weights alone, and the adapters' size.

  .venv/bin/python benchmarks/lora_bytes.py --json=docs/benchmarks/2026-12-02/lora_base_bytes.json
"""

import argparse
import json
import math

import jax

from mio_jax import config as mio_config
from mio_jax import models
from mio_jax.models import lora_decoder, quant


def measure(storage: str) -> dict:
    c = mio_config.base_config()
    c.model.path = "smollm2"
    c.model.lora.enabled = True
    c.model.lora.quantize = storage
    model = lora_decoder.load(c, models.resolve_model_path(c.model.path), None, None)
    _, params, other = lora_decoder.split(model)
    n_adapter, adapter_bytes = lora_decoder.parameter_count(params)
    linear_bytes = linear_values = 0
    for leaf in jax.tree.leaves(other, is_leaf=lambda x: isinstance(x, quant.QuantizedWeight)):
        if isinstance(leaf, quant.QuantizedWeight):
            linear_bytes += leaf.nbytes
            linear_values += math.prod(leaf.shape)
    base_values = sum(math.prod(x.shape) for x in jax.tree.leaves(
        other, is_leaf=lambda x: isinstance(x, quant.QuantizedWeight)))
    _, base_bytes = lora_decoder.parameter_count(other)
    return {"storage": storage, "base_values": base_values, "base_bytes": base_bytes,
            "base_bytes_per_param": base_bytes / base_values,
            "quantized_linear_bytes_per_param": (linear_bytes / linear_values
                                                 if linear_values else None),
            "adapter_values": n_adapter, "adapter_bytes": adapter_bytes}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--storages", default="none,int8,nf4,gguf")
    p.add_argument("--json", default="")
    a = p.parse_args()
    rows = [measure(s) for s in a.storages.split(",")]
    print("| base storage | base MiB | bytes / base parameter | bytes / quantized linear "
          "weight | adapter values | adapter MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        q = r["quantized_linear_bytes_per_param"]
        print(f"| {r['storage']} | {r['base_bytes'] / 2**20:.1f} | "
              f"{r['base_bytes_per_param']:.3f} | {'-' if q is None else f'{q:.3f}'} | "
              f"{r['adapter_values']} | {r['adapter_bytes'] / 2**20:.1f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
