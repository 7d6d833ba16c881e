"""The reference's log-probs computed once: one split's unshuffled pass under given weights,
cached on disk (``reference.build_or_load``), and gathered across processes so that every
process can look up any group of a shuffled batch. Used by the trainer's reference stage
and by each online round.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from mio_jax import reference as reference_lib
from mio_jax import rollouts as rollouts_lib
from mio_jax import stages
from mio_jax import train_step as step_lib
from mio_jax.data import pipeline as data_lib


def precompute_table(config, model: stages.Model, sharding, mesh, cfg: step_lib.StepConfig,
                     split: data_lib.PreparedSplit, name: str, *, params, view: str,
                     cache_dir: str, weights_fp: str) -> reference_lib.ReferenceTable:
    """Reference log-probs of one split under ``params`` seen as ``view``
    (``train_step.VIEWS``: "base" for the initial model, "policy" for a policy's own): one
    unshuffled, unshared pass, cached under ``cache_dir`` by the split's contents,
    ``weights_fp`` and the settings."""
    dcfg = config.data.copy_and_resolve_references()
    with dcfg.unlocked():  # the reference pass reads every group in the [B, K, L] layout
        dcfg.packing = False
        dcfg.shared_prompt = False
    ref_fn = jax.jit(functools.partial(step_lib.reference_logps, model.graphdef, cfg=cfg,
                                       view=view))

    def batches():
        return data_lib.make_pipeline(dcfg, model.tokenizer, split="eval",
                                      batch_size=config.reference.batch_size, prepared=split)

    def logps_of(host) -> np.ndarray:
        out = ref_fn(params, model.other, data_lib.to_global_arrays(host, sharding))
        if jax.process_count() > 1:  # this process's rows, matching its host batch
            out = multihost_utils.global_array_to_host_local_array(out, mesh, sharding.spec)
        return np.asarray(jax.device_get(out))

    settings = {"dtype": config.model.dtype, "ld_alpha": config.loss.ld_alpha, "split": name,
                "K": split.K}
    table, path, hit = reference_lib.build_or_load(
        cache_dir=cache_dir, batches=batches, ref_fn=logps_of, weights_fp=weights_fp,
        settings=settings, name=name)
    logging.info("reference log-probs (%s): %s %s", name, "cache hit" if hit else "computed", path)
    return gather_table(table, len(split.groups)) if jax.process_count() > 1 else table


def gather_table(table: reference_lib.ReferenceTable, n: int) -> reference_lib.ReferenceTable:
    """The table of every group: each process computed (and cached) the rows of its share
    of the unshuffled pass, but shuffled training batches hand it any group."""
    k = table.logps_nk.shape[1]
    logps, present = np.zeros((n, k), np.float32), np.zeros((n,), bool)
    m = min(len(table.present_n), n)
    logps[:m], present[:m] = table.logps_nk[:m], table.present_n[:m]
    all_logps = np.asarray(multihost_utils.process_allgather(logps))  # [P, N, K]
    all_present = np.asarray(multihost_utils.process_allgather(present))  # [P, N]
    chosen = np.argmax(all_present, axis=0)  # a process that holds the row
    return reference_lib.ReferenceTable(all_logps[chosen, np.arange(n)], all_present.any(axis=0))


def rollout_token_table(run: stages.Run, ro: rollouts_lib.Rollouts, *, params, view: str,
                        batch_size: int) -> np.ndarray:
    """``[N, G, L]`` float32 per-token log-probs of every completion of a round's rollouts
    under ``params`` seen as ``view``: one unshuffled pass in global batches of
    ``batch_size`` groups, gathered so that every process holds the whole table."""
    fn = jax.jit(functools.partial(step_lib.token_logps, run.model.graphdef, cfg=run.step_cfg,
                                   view=view))
    n = len(ro.groups)
    table = np.zeros((n, ro.num_generations, ro.length), np.float32)
    for b in range(rollouts_lib.steps_per_iteration(n, batch_size)):
        ids = rollouts_lib.in_order_ids(n, batch_size, b)
        host = rollouts_lib.local_batch(ro, ids, pad_id=run.config.data.pad_id,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count())
        out = fn(params, run.model.other, data_lib.to_global_arrays(host, run.data.sharding))
        out = np.asarray(multihost_utils.process_allgather(out, tiled=True))
        table[ids[ids >= 0]] = out[ids >= 0]
    return table
