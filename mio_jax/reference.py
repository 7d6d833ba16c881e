"""Precomputed reference log-probs: one pass before training, cached on disk.

The cache maps each group's token content to its reference log-prob sums
``[K]``. A group is identified by a 128-bit BLAKE2 digest of its real tokens
(``input_ids``, ``targets`` and ``loss_mask`` where ``attention_mask`` is 1,
for each completion slot), so lookups do not depend on shuffling, bucketing,
padding or batch size. The cache file is named by a key that hashes

* the data: the sorted digests of every group (so the tokenisation settings
  and the tokenizer are covered: any change changes the tokens);
* the reference weights: a fingerprint of every parameter (shape, dtype and
  exact float32 reductions);
* the settings that change reference log-probs (compute dtype, LD-DPO alpha).

A cache written for other data or weights has another key and is never read.
Training batches then look their groups up by ``example_id`` in a table built
from this run's digests; a group without log-probs raises ``StaleCacheError``.
Files are ``.npz`` (no pickle) plus a JSON description.

The frozen reference (``reference.mode="frozen"``) instead keeps its weights in memory,
in the compute dtype (``models.frozen.frozen_params``).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mio_jax import paths
from mio_jax.errors import ConfigError

DIGEST_BYTES = 16


class StaleCacheError(RuntimeError):
    """The reference cache does not hold a group of the current data."""


def group_digests(input_ids_bkl, targets_bkl, loss_mask_bkl, attention_mask_bkl,
                  valid_bk=None) -> np.ndarray:
    """128-bit digests of each group's real tokens.

    Args:
      input_ids_bkl, targets_bkl, loss_mask_bkl, attention_mask_bkl: host
        arrays ``[B, K, L]``.
      valid_bk: ``[B, K]`` completion-present flags (absent slots are skipped).

    Returns:
      ``[B]`` numpy array of dtype ``S16``.
    """
    ids, tgt = np.asarray(input_ids_bkl), np.asarray(targets_bkl)
    lm, am = np.asarray(loss_mask_bkl), np.asarray(attention_mask_bkl) != 0
    b, k, _ = ids.shape
    valid = np.ones((b, k), bool) if valid_bk is None else np.asarray(valid_bk, bool)
    out = np.empty((b,), dtype=f"S{DIGEST_BYTES}")
    for i in range(b):
        h = hashlib.blake2b(digest_size=DIGEST_BYTES)
        for j in range(k):
            h.update(b"|slot|")
            if not valid[i, j]:
                continue
            keep = am[i, j]
            h.update(ids[i, j][keep].astype(np.int64).tobytes())
            h.update(b"|t|")
            h.update(tgt[i, j][keep].astype(np.int64).tobytes())
            h.update(b"|m|")
            h.update((lm[i, j][keep] != 0).astype(np.uint8).tobytes())
        out[i] = h.digest()
    return out


def weights_fingerprint(params: Any) -> str:
    """A hex fingerprint of a parameter pytree (shapes, dtypes, float32 reductions).

    Reductions run on device (the params stay sharded); their float32 bits
    are printed with 9 significant digits so a change of any weight changes
    the fingerprint, while a recompute on another mesh of the same weights
    still matches up to reduction-order noise at the last digit.
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)

    @jax.jit
    def reduce(xs):
        out = []
        for x in xs:
            x32 = x.astype(jnp.float32).reshape(-1)
            ramp = jnp.cos(jnp.arange(x32.shape[0], dtype=jnp.float32) * 0.61803398875)
            out.append(jnp.stack([x32.sum(), (x32 * x32).sum(), (x32 * ramp).sum()]))
        return out

    stats = jax.device_get(reduce([x for _, x in leaves]))
    h = hashlib.sha256()
    for (path, x), s in zip(leaves, stats):
        h.update(f"{jax.tree_util.keystr(path)}|{x.shape}|{x.dtype}|".encode())
        h.update(",".join(f"{float(v):.6e}" for v in s).encode())
    return h.hexdigest()


def cache_key(data_digests: np.ndarray, weights_fp: str, settings: dict) -> str:
    """Key of a cache: hash of the sorted group digests, the weights and settings."""
    h = hashlib.sha256()
    h.update(np.sort(np.asarray(data_digests, dtype=f"S{DIGEST_BYTES}")).tobytes())
    h.update(weights_fp.encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:32]


class ReferenceCache:
    """Reference log-probs of every group, looked up by group digest.

    Args:
      digests: ``[N]`` S16 digests.
      logps_nk: ``[N, K]`` float32 reference log-prob sums.
    """

    def __init__(self, digests: np.ndarray, logps_nk: np.ndarray):
        self.digests = np.asarray(digests, dtype=f"S{DIGEST_BYTES}")
        self.logps_nk = np.asarray(logps_nk, np.float32)
        self._index = {d: i for i, d in enumerate(self.digests.tolist())}

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._index

    def get(self, digest: bytes) -> np.ndarray:
        """``[K]`` log-probs of one group."""
        return self.logps_nk[self._index[digest]]

    def save(self, path: str, meta: dict) -> None:
        """Writes ``path`` (.npz) and ``path + '.json'`` atomically (local or remote)."""
        buffer = io.BytesIO()
        np.savez(buffer, digests=self.digests.view(np.uint8).reshape(-1, DIGEST_BYTES),
                 logps=self.logps_nk)
        paths.write_bytes(path, buffer.getvalue())
        paths.write_json(path + ".json", meta, indent=1, sort_keys=True)

    @classmethod
    def load(cls, path: str) -> "ReferenceCache":
        with np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False) as z:
            digests = np.ascontiguousarray(z["digests"]).view(f"S{DIGEST_BYTES}").reshape(-1)
            return cls(digests, z["logps"])


class ReferenceTable:
    """Reference log-probs of the current run's groups, indexed by ``example_id``.

    Built from a key-verified cache and the digests of this run's data, so an
    ``example_id`` always maps to the log-probs of the group it names now.

    Args:
      logps_nk: ``[N, K]`` float32, row ``i`` for ``example_id == i``.
      present_n: ``[N]`` bool, rows that were filled.
    """

    def __init__(self, logps_nk: np.ndarray, present_n: np.ndarray):
        self.logps_nk, self.present_n = logps_nk, present_n

    def lookup(self, example_id_b: np.ndarray, weights_b: np.ndarray | None = None) -> np.ndarray:
        """``[B, K]`` reference log-probs; zeros for padding groups (id -1 or weight 0).

        Raises:
          StaleCacheError: a real group of the batch has no reference log-probs.
        """
        ids = np.asarray(example_id_b)
        real = ids >= 0 if weights_b is None else (ids >= 0) & (np.asarray(weights_b) != 0)
        out = np.zeros((len(ids), self.logps_nk.shape[1]), np.float32)
        if real.any():
            r_ids = ids[real]
            bad = (r_ids >= len(self.present_n)) | ~self.present_n[np.minimum(
                r_ids, len(self.present_n) - 1)]
            if bad.any():
                raise StaleCacheError(
                    f"example_id(s) {r_ids[bad][:8].tolist()} have no precomputed reference "
                    "log-probs: the data changed after the reference pass")
            out[real] = self.logps_nk[r_ids]
        return out


def _digests_of(batch) -> np.ndarray:
    return group_digests(batch.input_ids, batch.targets, batch.loss_mask,
                         batch.attention_mask, batch.valid)


def build_or_load(*, cache_dir: str, batches: Callable[[], Iterable[Any]],
                  ref_fn: Callable[[Any], np.ndarray], weights_fp: str,
                  settings: dict, name: str = "") -> tuple[ReferenceTable, str, bool]:
    """Returns the reference log-probs of every group, computing them on a cache miss.

    Args:
      cache_dir: folder of cache files (a local path or a URL such as ``gs://...``).
      batches: callable returning one unshuffled, unpacked pass over every
        group (host ``PreferenceBatch``es of numpy ``[B, K, L]`` arrays); called at
        most twice (digests first, then the forward pass on a miss).
      ref_fn: host batch -> ``[B, K]`` reference log-prob sums (numpy).
      weights_fp: ``weights_fingerprint`` of the reference params.
      settings: other values the log-probs depend on (JSON-able).
      name: the split's name, part of the file name, so that only a cache of the same
        split can be called stale.

    Returns:
      ``(table, path, hit)``.
    """
    ids, digs = [], []
    k = 2
    for b in batches():
        real = np.asarray(b.example_id) >= 0
        ids.append(np.asarray(b.example_id)[real])
        digs.append(_digests_of(b)[real])
        k = b.input_ids.shape[1]
    ids = np.concatenate(ids) if ids else np.zeros((0,), np.int64)
    digs = np.concatenate(digs) if digs else np.zeros((0,), f"S{DIGEST_BYTES}")
    key = cache_key(np.unique(digs), weights_fp, settings)
    # Each process caches the groups it reads (its data shard) in its own file.
    suffix = f"_p{jax.process_index()}" if jax.process_count() > 1 else ""
    prefix = f"reference_logps_{name}_" if name else "reference_logps_"
    path = paths.join(cache_dir, f"{prefix}{key}{suffix}.npz")
    cache, hit = None, False
    if paths.exists(path):
        try:
            cache = ReferenceCache.load(path)
            missing = sum(d not in cache for d in digs.tolist())
            if missing:
                logging.warning("reference cache %s lacks %d groups; recomputing", path, missing)
                cache = None
            else:
                hit = True
                logging.info("reference cache hit: %s (%d groups)", path, len(cache))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            logging.warning("reference cache %s is unreadable (%s); recomputing", path, e)
            cache = None
    if cache is None:
        if paths.isdir(cache_dir) and any(f.startswith(prefix) and f.endswith(".npz")
                                          for f in paths.listdir(cache_dir)):
            logging.warning("reference cache files in %s do not match the current data / "
                            "reference weights / settings (stale, not used); computing anew",
                            cache_dir)
        keep_d, keep_l = [], []
        for b in batches():
            real = np.asarray(b.example_id) >= 0
            keep_d.append(_digests_of(b)[real])
            keep_l.append(np.asarray(ref_fn(b), np.float32)[real])
        cache = ReferenceCache(np.concatenate(keep_d) if keep_d else digs,
                               np.concatenate(keep_l) if keep_l else np.zeros((0, k), np.float32))
        cache.save(path, {"key": key, "weights": weights_fp, "settings": settings,
                          "groups": len(cache)})
        logging.info("reference cache written: %s (%d groups)", path, len(cache))
    n = int(ids.max()) + 1 if len(ids) else 0
    logps = np.zeros((n, cache.logps_nk.shape[1] if len(cache) else k), np.float32)
    present = np.zeros((n,), bool)
    for i, d in zip(ids.tolist(), digs.tolist()):
        logps[i] = cache.get(d)
        present[i] = True
    return ReferenceTable(logps, present), path, hit


# Where the reference log-probs come from (``reference.mode``): a frozen copy of the
# weights run in every step, one precompute pass cached on disk, or no reference.
REFERENCE_MODES = ("frozen", "precomputed", "none")


def validate_reference_config(cfg) -> None:
    """Checks the ``reference`` section: a known ``reference.mode`` and
    ``reference.batch_size >= 1`` (whether the loss needs a reference is the loss
    section's rule, ``mio_jax.losses.config``).

    Args:
      cfg: the whole experiment config (reads ``cfg.reference``).

    Raises:
      mio_jax.config.ConfigError: naming the key.
    """
    r = cfg.reference
    if r.mode not in REFERENCE_MODES:
        raise ConfigError(f"reference.mode={r.mode!r}: expected one of {REFERENCE_MODES}")
    if r.batch_size < 1:
        raise ConfigError(f"reference.batch_size={r.batch_size} must be >= 1")
