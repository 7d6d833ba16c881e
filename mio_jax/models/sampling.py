"""Batched text generation with a KV cache (greedy, temperature, top-k, top-p).

Prompts are left-padded into shape buckets (powers of two for the batch and the number
of new tokens, eighths of a power of two for the prompt length) so one compiled program
serves many calls. The prompt is prefilled in one pass, then a `lax.while_loop` decodes
one token per step until every row has produced an end-of-sequence token or
`max_new_tokens` is reached, with no host round trip in between. Each row keeps its own
RoPE positions, so left padding does not change a row's tokens.

A step's work is the model's forward for one token per row and the sampling rule: the
layers' weights and KV caches are separate arrays per layer that the loop reads in
place (`Decoder.decode_weights`, `Decoder.decode`), and greedy decoding is an argmax.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend.random import threefry2x32_p

from mio_jax.models.llama import Decoder, default_positions


@dataclasses.dataclass
class GenerationResult:
    """Output of `generate` / `generate_ids` (one entry per prompt, in input order).

    texts: decoded completions (special tokens skipped, cut before a stop string).
    token_ids: completion token ids (EOS included when produced; up to the stop string).
    prompt_token_ids: the tokenised prompts.
    finish_reasons: "eos", "stop" (a stop string) or "length".
    """

    texts: list[str]
    token_ids: list[list[int]]
    prompt_token_ids: list[list[int]]
    finish_reasons: list[str]


def _bucket(n: int, minimum: int = 1) -> int:
    """The power of two >= n (at least `minimum`)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def _length_bucket(n: int) -> int:
    """Prompt length bucket: n rounded up to a multiple of an eighth of the power of two
    >= n, and of 8: 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, ... (at most 25 % above n).
    The prefill's work grows with it; a power of two would cost up to twice the prompt."""
    step = max(8, _bucket(n) // 8)
    return -(-int(n) // step) * step


def _order_keys(x):
    """float32 -> int32 keys in the same order (negative floats' bits flipped)."""
    i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)


def _cut_key(keys, weights, level):
    """Per row, the smallest int32 ``t`` whose weight strictly above it is below ``level``:
    ``sum(weights[keys > t]) < level``. It is a key of the row (the weight above ``t`` only
    changes at the row's keys), found by bisection over the 2^32 keys in 32 passes over
    the row instead of a sort."""
    lo = jnp.min(keys, axis=-1, keepdims=True) - 1  # the smallest key is above int32's min
    hi = jnp.max(keys, axis=-1, keepdims=True)

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo & hi) + ((lo ^ hi) >> 1)          # floor((lo + hi) / 2) without overflow
        below = jnp.sum(jnp.where(keys > mid, weights, 0), axis=-1, keepdims=True) < level
        return jnp.where(below, lo, mid), jnp.where(below, mid, hi)

    return jax.lax.fori_loop(0, 32, halve, (lo, hi))[1]


def _top_k_and_nucleus(scaled_bv, top_k, top_p):
    """`scaled_bv` with every entry outside the top-k and outside the top-p nucleus set to
    -inf. The nucleus is the smallest set of largest entries whose probability (after the
    top-k cut) reaches top_p; ties with its smallest member stay in. Both cuts are found
    by `_cut_key`, so no row of the vocabulary is sorted."""
    keys = _order_keys(scaled_bv)
    kth = jax.lax.cond(top_k > 0, lambda: _cut_key(keys, jnp.ones((), jnp.int32), top_k),
                       lambda: jnp.full(keys.shape[:-1] + (1,), jnp.iinfo(jnp.int32).min))
    scaled_bv = jnp.where(keys < kth, -jnp.inf, scaled_bv)
    probs = jax.nn.softmax(scaled_bv, axis=-1)
    nucleus = jax.lax.cond(top_p < 1, lambda: _cut_key(keys, probs, top_p),
                           lambda: jnp.full(keys.shape[:-1] + (1,), jnp.iinfo(jnp.int32).min))
    return jnp.where(keys < nucleus, -jnp.inf, scaled_bv)


# Entries of a row searched first for the top-k / top-p cut (`_candidate_cut`); 0 cuts
# every row by bisection (the sampler before the candidate path, for benchmarks).
CANDIDATES = 256


def _candidate_cut(scaled_bv, top_k, top_p, count=CANDIDATES):
    """The top-k / top-p cut found among each row's `count` largest entries, when it lies
    there: ``(values, indices, keep, ok)``, the candidates (`[B, c]`, largest first), which
    of them the cut keeps, and per row whether every kept entry of the row is a candidate.

    The rule is `_top_k_and_nucleus`'s: keep the entries whose key is at least the k-th
    largest key, then, with the probabilities of what is kept, the smallest set of largest
    entries whose mass reaches top_p and every entry tied with its smallest. Here the mass
    is a cumulative sum over the sorted candidates rather than a masked sum over the row
    (the two can differ in the last bits, so a cumulative mass within float32 rounding of
    top_p may be decided differently; the draws are otherwise the same). A row whose kept
    set reaches its `count`-th candidate (a flat distribution) is not `ok`."""
    V = scaled_bv.shape[-1]
    c = min(count, V)
    values, indices = jax.lax.top_k(scaled_bv, c)
    # (the candidates' columns are read by masked reductions: XLA:CPU turns a top_k whose
    # values are sliced into a sort of the whole row)
    column = jnp.arange(c)[None, :]

    def at(x, j, fill):  # x[b, j[b]]
        return jnp.max(jnp.where(column == j[:, None], x, fill), axis=-1)

    ck = _order_keys(values)
    lowest = jnp.iinfo(jnp.int32).min
    smallest = jnp.min(values, axis=-1)
    kk = jnp.broadcast_to(jnp.clip(top_k - 1, 0, c - 1), values.shape[:1])
    kth = jnp.where(top_k > 0, at(ck, kk, lowest), lowest)[:, None]
    ok = (top_k <= 0) | ((top_k < c) & (smallest < at(values, kk, -jnp.inf)))
    cut = jnp.where(_order_keys(scaled_bv) < kth, -jnp.inf, scaled_bv)
    mass = jnp.cumsum(jnp.take_along_axis(jax.nn.softmax(cut, axis=-1), indices, axis=-1),
                      axis=-1)
    reach = mass >= top_p
    j = jnp.argmax(reach, axis=-1)                    # the first candidate reaching top_p
    nucleus = jnp.where(top_p < 1, at(ck, j, lowest), lowest)[:, None]
    ok &= (top_p >= 1) | (jnp.any(reach, axis=-1) & (smallest < at(values, j, -jnp.inf)))
    ok &= (top_k > 0) | (top_p < 1)
    ok &= ~jnp.any(values == 0, axis=-1)  # -0.0 and +0.0: equal floats, distinct keys
    return values, indices, (ck >= kth) & (ck >= nucleus), ok


def _bits_at(key, shape, indices):
    """`jax.random.bits(key, shape, uint32)` (or, for `[B]` keys, each row's draw of
    `shape[1:]`) at `indices` (`[B, c]`) only. With JAX's partitionable threefry (its
    default) the bits of flat index n are the threefry hash of the counter n, so the `c`
    entries are hashed alone; otherwise the whole row is drawn and gathered."""
    if not (jax.config.jax_threefry_partitionable
            and str(jax.random.key_impl(key)) == "threefry2x32"):
        if jnp.ndim(key) == 1:
            bits = jax.vmap(lambda k: jax.random.bits(k, shape[1:], jnp.uint32))(key)
        else:
            bits = jax.random.bits(key, shape, jnp.uint32)
        return jnp.take_along_axis(bits, indices, axis=-1)
    data = jax.random.key_data(key)
    if jnp.ndim(key) == 1:  # row b's counter is its column
        counter, k1, k2 = indices, data[:, :1], data[:, 1:]
    else:                   # the batch's counter runs over the flattened [B, V]
        counter = indices + jnp.arange(shape[0])[:, None] * shape[1]
        k1, k2 = data[0], data[1]
    lo = counter.astype(jnp.uint32)
    hi, k1, k2 = (jnp.broadcast_to(x, lo.shape).astype(jnp.uint32)
                  for x in (jnp.zeros((), jnp.uint32), k1, k2))
    a, b = threefry2x32_p.bind(k1, k2, hi, lo)
    return a ^ b


def _gumbel_at(key, shape, indices):
    """The Gumbel noise `jax.random.categorical(key, logits)` adds to the `[B, V]` logits,
    at `indices` (`[B, c]`) only: the same bits (`_bits_at`) and the same float32
    operations as `jax.random.gumbel`'s, for the `c` entries alone."""
    bits = _bits_at(key, shape, indices)
    tiny = jnp.finfo(jnp.float32).tiny
    one = jnp.float32(1.0)
    floats = jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000),
                                          jnp.float32) - one
    u = jnp.maximum(tiny, floats * (one - tiny) + tiny)
    return -jnp.log(-jnp.log(u))


def _draw(scaled_bv, key):
    """The Gumbel-max draw of each row, `jax.random.categorical`'s."""
    if jnp.ndim(key) == 1:  # one key per row: a row's draw ignores the others
        return jax.vmap(jax.random.categorical)(key, scaled_bv).astype(jnp.int32)
    return jax.random.categorical(key, scaled_bv, axis=-1).astype(jnp.int32)


def _draw_truncated(scaled_bv, key, top_k, top_p):
    """The draw of each row cut by top-k / top-p. When every row's cut lies among its
    `CANDIDATES` largest entries, the draw runs on those alone (the same noise, the same
    winner, lowest index first among equals, as the full row's draw, but for the rounding
    case `_candidate_cut` names); otherwise the row is cut by bisection
    (`_top_k_and_nucleus`) and drawn whole."""
    def whole_rows():
        return _draw(_top_k_and_nucleus(scaled_bv, top_k, top_p), key)

    if CANDIDATES == 0:
        return whole_rows()
    values, indices, keep, ok = _candidate_cut(scaled_bv, top_k, top_p, CANDIDATES)

    def among_candidates():
        score = jnp.where(keep, values + _gumbel_at(key, scaled_bv.shape, indices), -jnp.inf)
        best = jnp.max(score, axis=-1, keepdims=True)
        return jnp.min(jnp.where(score == best, indices, scaled_bv.shape[-1]),
                       axis=-1).astype(jnp.int32)

    return jax.lax.cond(jnp.all(ok), among_candidates, whole_rows)


def sample_logits(logits_bv, key, temperature, top_k, top_p):
    """Draws one token per row.

    Only the rule asked for runs (`lax.cond` on the traced settings): greedy is an
    argmax, plain temperature sampling a Gumbel-max draw over the row; top-k and top-p
    cut the row first, among its largest entries when the cut lies there
    (`_candidate_cut`: the cut and the noise, a third of a 49k-vocabulary decode step on a
    CPU when done on the whole row, then cost a fifth of that), else by bisection on its
    values (`_top_k_and_nucleus`; a sort of the vocabulary was most of a decode step's
    time).

    Args:
      logits_bv: float32 `[B, V]`.
      key: PRNG key, or `[B]` keys (one per row).
      temperature: scalar; 0 means greedy (argmax).
      top_k: int scalar; 0 disables.
      top_p: scalar in (0, 1]; 1 disables.
    Returns:
      int32 `[B]`.
    """
    temperature, top_k, top_p = (jnp.asarray(temperature, jnp.float32),
                                 jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32))

    def greedy(logits_bv):
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)

    def sampled(logits_bv):
        scaled = logits_bv / jnp.maximum(temperature, 1e-6)
        return jax.lax.cond((top_k > 0) | (top_p < 1), _draw_truncated,
                            lambda s, k, tk, tp: _draw(s, k), scaled, key, top_k, top_p)

    return jax.lax.cond(temperature <= 0, greedy, sampled, logits_bv)


@functools.partial(jax.jit, static_argnames=("graphdef", "n_new", "use_cache"))
def _generate_padded(graphdef, state, ids_bp, valid_bp, max_new, key, temperature, top_k,
                     top_p, eos_ids, pad_id, *, n_new: int, use_cache: bool):
    """Jitted core: `[B, P]` left-padded prompts -> (`[B, n_new]` tokens, `[B]` lengths)."""
    model = nnx.merge(graphdef, state)
    B, P = ids_bp.shape
    positions = default_positions(ids_bp, valid_bp)
    out = jnp.full((B, n_new), pad_id, jnp.int32)
    done = jnp.zeros((B,), bool)
    lengths = jnp.zeros((B,), jnp.int32)

    def pick(step, logits_bv, done, out, lengths):
        tok = sample_logits(logits_bv, jax.random.fold_in(key, step), temperature, top_k, top_p)
        tok = jnp.where(done, pad_id, tok)
        out = out.at[:, step].set(tok)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)
        return tok, done, out, lengths

    if use_cache:
        # The first token comes from the prefill's logits; each loop step then decodes
        # the last token and picks the next, so n tokens cost n - 1 decode steps.
        weights = model.decode_weights()
        cache = model.init_cache(B, P + n_new)
        logits, cache = model.decode(ids_bp, positions, valid_bp, cache, weights, last_only=True)
        tok, done, out, lengths = pick(0, logits[:, -1], done, out, lengths)
        carry = (jnp.int32(1), tok, positions[:, -1], done, out, lengths, cache)

        def body(c):
            step, tok, pos, done, out, lengths, cache = c
            pos = pos + 1
            logits, cache = model.decode(tok[:, None], pos[:, None], jnp.ones((B, 1), bool),
                                         cache, weights)
            tok, done, out, lengths = pick(step, logits[:, 0], done, out, lengths)
            return step + 1, tok, pos, done, out, lengths, cache
    else:
        buf = jnp.concatenate([ids_bp, jnp.full((B, n_new), pad_id, ids_bp.dtype)], axis=1)
        valid = jnp.concatenate([valid_bp, jnp.zeros((B, n_new), valid_bp.dtype)], axis=1)
        logits = model(buf, attention_mask=valid)[:, P - 1]
        carry = (jnp.int32(0), logits, (buf, valid), done, out, lengths, None)

        def body(c):
            step, logits_bv, (buf, valid), done, out, lengths, _ = c
            tok, done, out, lengths = pick(step, logits_bv, done, out, lengths)
            buf = jax.lax.dynamic_update_slice(buf, tok[:, None].astype(buf.dtype), (0, P + step))
            valid = jax.lax.dynamic_update_slice(valid, jnp.ones((B, 1), valid.dtype), (0, P + step))
            logits = model(buf, attention_mask=valid)
            logits_bv = jax.lax.dynamic_index_in_dim(logits, P + step, axis=1, keepdims=False)
            return step + 1, logits_bv, (buf, valid), done, out, lengths, None

    def cond(c):
        return (c[0] < max_new) & ~jnp.all(c[3])

    final = jax.lax.while_loop(cond, body, carry)
    return final[4], final[5]


# ---- rollouts: G samples per prompt, the prompt's cache shared, the batch kept full ----

def _row_keys(key, row_ids):
    return jax.vmap(lambda r: jax.random.fold_in(key, r))(row_ids)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnums=(2,))
def _insert_samples(graphdef, state, rows_state, ids_up, valid_up, rows_r, prompt_r, sample_r,
                    gstep, key, temperature, top_k, top_p, eos_ids, pad_id, max_new):
    """Starts samples in the rows `rows_r` (`[R]`; an index past the batch is padding and is
    dropped), sample `sample_r[j]` of prompt `prompt_r[j]` of the `U` prompts `ids_up`:
    each prompt prefilled once, its keys and values written into its rows' ring slots just
    before the step `gstep` writes, each row's first token drawn from its prompt's last
    logits with the sample's own key."""
    model = nnx.merge(graphdef, state)
    tok, pos, t, done, out, keys, cache = rows_state
    P = ids_up.shape[1]
    R = rows_r.shape[0]
    S = cache["valid"].shape[1]
    positions = default_positions(ids_up, valid_up)
    small = model.init_cache(ids_up.shape[0], P)
    logits, small = model.decode(ids_up, positions, valid_up, small, model.decode_weights(),
                                 last_only=True)

    def rep(x):  # each row's prompt's value
        return jnp.take(x, prompt_r, axis=0)

    slots = (gstep - P + jnp.arange(P)) % S

    def put(big, prompt):  # a fresh row: the prompt's entries at its ring slots, else zeros
        fresh = jnp.zeros((R, *big.shape[1:]), big.dtype)
        fresh = fresh.at[:, :, slots, :].set(rep(prompt).astype(big.dtype))
        return big.at[rows_r].set(fresh, mode="drop")

    def put_rows(big, prompt):  # the same for a per-slot `[B, S]` array
        fresh = jnp.zeros((R, S), big.dtype).at[:, slots].set(rep(prompt))
        return big.at[rows_r].set(fresh, mode="drop")

    cache = dict(cache, k=tuple(put(b, q) for b, q in zip(cache["k"], small["k"])),
                 v=tuple(put(b, q) for b, q in zip(cache["v"], small["v"])),
                 **{n: put_rows(cache[n], small[n]) for n in ("valid", "positions")
                    if n in cache})
    new_keys = _row_keys(key, sample_r.astype(jnp.uint32))
    first = sample_logits(rep(logits[:, -1]), jax.vmap(lambda k: jax.random.fold_in(k, 0))(
        new_keys), temperature, top_k, top_p)
    first_out = jnp.full((R, out.shape[1]), pad_id, jnp.int32).at[:, 0].set(first)
    ends = jnp.any(first[:, None] == eos_ids[None, :], axis=-1) | (max_new <= 1)
    return (tok.at[rows_r].set(first, mode="drop"),
            pos.at[rows_r].set(rep(positions[:, -1]) + 1, mode="drop"),
            t.at[rows_r].set(1, mode="drop"),
            done.at[rows_r].set(ends, mode="drop"),
            out.at[rows_r].set(first_out, mode="drop"),
            keys.at[rows_r].set(new_keys, mode="drop"),
            cache)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnums=(2,))
def _decode_ring(graphdef, state, rows_state, gstep, steps, temperature, top_k, top_p,
                 eos_ids, pad_id, max_new):
    """Up to `steps` decode steps of every running row (or until none runs): each step
    writes the ring slot `gstep % S` of every row, and a row draws its token `t` from its
    own key folded with `t`. Returns the rows' state and the steps taken."""
    model = nnx.merge(graphdef, state)
    weights = model.decode_weights()
    S = rows_state[6]["valid"].shape[1]
    columns = jnp.arange(rows_state[4].shape[1])[None, :]

    def body(c):
        n, g, (tok, pos, t, done, out, keys, cache) = c
        live = ~done
        cache = dict(cache, index=(g % S).astype(jnp.int32))
        logits, cache = model.decode(tok[:, None], pos[:, None], live[:, None], cache, weights,
                                     ring=True)
        step_keys = jax.vmap(jax.random.fold_in)(keys, t.astype(jnp.uint32))
        new = sample_logits(logits[:, 0], step_keys, temperature, top_k, top_p)
        out = jnp.where(live[:, None] & (columns == t[:, None]), new[:, None], out)
        t = t + live
        ends = jnp.any(new[:, None] == eos_ids[None, :], axis=-1) | (t >= max_new)
        state = (jnp.where(live, new, tok), pos + live, t, done | (live & ends), out, keys,
                 cache)
        return n + 1, g + 1, state

    def cond(c):
        return (c[0] < steps) & ~jnp.all(c[2][3])

    n, _, rows_state = jax.lax.while_loop(cond, body, (jnp.int32(0), gstep, rows_state))
    return rows_state, n


def generate_groups(model: Decoder, prompt_ids: Sequence[Sequence[int]], *, num_samples: int,
                    max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                    top_k: int = 0, eos_ids: Sequence[int] = (), pad_id: int = 0,
                    seed: int = 0, batch_size: int | None = None, chunk_steps: int = 8
                    ) -> list[list[int]]:
    """`num_samples` completions of every prompt (RL rollouts), flat and prompt-major:
    completion `i * num_samples + g` is sample g of prompt i.

    The batch keeps `batch_size` rows decoding: after every `chunk_steps` tokens the rows
    whose samples have ended take the next waiting samples (a ring cache lets rows start at
    different steps); the samples started together that share a prompt share one prefill,
    its KV cache copied to their rows. Once no sample waits, the batch shrinks to the
    smallest power of two that holds the rows still running. Every sample draws from its
    own key (the seed folded with its index, then with the token's position), so a sample
    does not depend on `batch_size`, `chunk_steps` or the other rows of its batch.

    Args:
      model, max_new_tokens, temperature, top_p, top_k, eos_ids, pad_id, seed: as in
        `generate_ids`.
      prompt_ids: the distinct prompts (each non-empty).
      num_samples: G, samples per prompt.
      batch_size: rows decoding at once (a multiple of G; default: every sample).
      chunk_steps: tokens decoded between two refills.
    Returns:
      the `len(prompt_ids) * num_samples` completions' ids (EOS kept as the last token).
    """
    if max_new_tokens < 1 or num_samples < 1 or chunk_steps < 1:
        raise ValueError("max_new_tokens, num_samples and chunk_steps must be >= 1, got "
                         f"{max_new_tokens}, {num_samples}, {chunk_steps}")
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
    G, n = int(num_samples), len(prompt_ids)
    B = min(batch_size or n * G, n * G)
    if B % G:
        raise ValueError(f"batch_size={batch_size} is not a multiple of num_samples={G}")
    graphdef, state = nnx.split(model)
    n_new = _bucket(max_new_tokens, 8)
    P = _length_bucket(max(len(p) for p in prompt_ids))
    S = P + n_new  # a row's prompt and answer never wrap onto themselves
    eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
    key = jax.random.key(seed)
    sampling = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
    cache = model.init_cache(B, S)
    rows_state = (jnp.full((B,), pad_id, jnp.int32), jnp.zeros((B,), jnp.int32),
                  jnp.zeros((B,), jnp.int32), jnp.ones((B,), bool),
                  jnp.full((B, n_new), pad_id, jnp.int32), _row_keys(key, jnp.zeros((B,),
                                                                                     jnp.uint32)),
                  cache)
    sample_of_row = np.full(B, -1)  # the sample each row decodes (-1: free)
    results: list[list[int]] = [[] for _ in range(n * G)]
    waiting = list(range(n * G))  # samples not started, prompt-major
    gstep = P  # any start works on a ring
    while True:
        free = np.flatnonzero(sample_of_row < 0)
        take = min(len(free), len(waiting))
        if take:  # the next waiting samples into the free rows, each prompt prefilled once
            started, waiting = waiting[:take], waiting[take:]
            prompts = sorted({s // G for s in started})
            U, R = _bucket(len(prompts)), _bucket(take)
            ids = np.full((U, P), pad_id, np.int32)
            valid = np.zeros((U, P), np.int32)
            for r, i in enumerate(prompts + prompts[:1] * (U - len(prompts))):
                ids[r, P - len(prompt_ids[i]):] = prompt_ids[i]
                valid[r, P - len(prompt_ids[i]):] = 1
            rows = np.full(R, len(sample_of_row))  # padding: past the batch, dropped
            rows[:take] = free[:take]
            slot_of = {i: u for u, i in enumerate(prompts)}
            prompt_r = np.zeros(R, np.int32)
            prompt_r[:take] = [slot_of[s // G] for s in started]
            samples = np.zeros(R, np.int64)
            samples[:take] = started
            sample_of_row[free[:take]] = started
            rows_state = _insert_samples(
                graphdef, state, rows_state, jnp.asarray(ids), jnp.asarray(valid),
                jnp.asarray(rows, jnp.int32), jnp.asarray(prompt_r), jnp.asarray(samples),
                jnp.int32(gstep), key, *sampling, eos, jnp.int32(pad_id),
                jnp.int32(max_new_tokens))
        live = (sample_of_row >= 0) & ~_to_host(rows_state[3])
        _collect(results, rows_state, sample_of_row, (sample_of_row >= 0) & ~live)
        sample_of_row[~live] = -1
        if not live.any() and not waiting:
            break
        if not waiting and live.sum() <= len(sample_of_row) // 2:  # shrink to the live rows
            keep = np.flatnonzero(live)
            idx = np.concatenate([keep, np.full(_bucket(len(keep)) - len(keep), keep[0])])
            rows_state = jax.tree.map(lambda x: x[idx] if jnp.ndim(x) else x, rows_state)
            sample_of_row = np.where(np.arange(len(idx)) < len(keep), sample_of_row[idx], -1)
            rows_state = rows_state[:3] + (rows_state[3] | jnp.asarray(sample_of_row < 0),
                                           ) + rows_state[4:]
        if live.any():
            rows_state, taken = _decode_ring(graphdef, state, rows_state, jnp.int32(gstep),
                                             jnp.int32(chunk_steps), *sampling, eos,
                                             jnp.int32(pad_id), jnp.int32(max_new_tokens))
            gstep += int(taken)
    return results


def _collect(results, rows_state, sample_of_row, which) -> None:
    """Writes the ended samples of the rows `which` into `results` (by sample index)."""
    if not which.any():
        return
    out, t = _to_host(rows_state[4]), _to_host(rows_state[2])
    for r in np.flatnonzero(which):
        results[int(sample_of_row[r])] = out[r, :t[r]].tolist()


def _to_host(x: jax.Array) -> np.ndarray:
    """The whole array on this host: in a multi-process run the rows may live on other
    processes' devices (sharded like the batch), so every process gathers them."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def generate_ids(model: Decoder, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 eos_ids: Sequence[int] = (), pad_id: int = 0, seed: int = 0,
                 batch_size: int | None = None, use_cache: bool = True) -> list[list[int]]:
    """Generates from token-id prompts.

    Args:
      model: Decoder.
      prompt_ids: one non-empty id list per prompt (lengths may differ).
      max_new_tokens: upper bound on generated tokens per prompt.
      temperature, top_p, top_k: sampling controls (temperature 0 = greedy).
      eos_ids: ids that end a row (kept as its last token).
      pad_id: id used for padding (never attended to).
      seed: PRNG seed; identical seeds give identical samples.
      batch_size: prompts per compiled batch (default: all at once).
      use_cache: False recomputes the full forward each step (same tokens, slower).
    Returns:
      list of generated id lists, one per prompt.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
    graphdef, state = nnx.split(model)
    n_new = _bucket(max_new_tokens, 8)
    eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
    key = jax.random.key(seed)
    step = batch_size or len(prompt_ids)
    results: list[list[int]] = []
    for start in range(0, len(prompt_ids), step):
        chunk = [list(p) for p in prompt_ids[start:start + step]]
        B = _bucket(len(chunk))
        P = _length_bucket(max(len(p) for p in chunk))
        rows = chunk + [chunk[0]] * (B - len(chunk))
        ids = np.full((B, P), pad_id, np.int32)
        valid = np.zeros((B, P), np.int32)
        for r, p in enumerate(rows):
            ids[r, P - len(p):] = p
            valid[r, P - len(p):] = 1
        out, lengths = _generate_padded(
            graphdef, state, jnp.asarray(ids), jnp.asarray(valid), jnp.int32(max_new_tokens),
            jax.random.fold_in(key, start), jnp.float32(temperature), jnp.int32(top_k),
            jnp.float32(top_p), eos, jnp.int32(pad_id), n_new=n_new, use_cache=use_cache)
        out, lengths = _to_host(out), _to_host(lengths)
        results.extend(out[r, :lengths[r]].tolist() for r in range(len(chunk)))
    return results


def _encode(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
        text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True,
                                             tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    raise TypeError(f"a prompt must be a string or a list of chat messages, got {type(prompt)}")


def _cut_at_stop(tokenizer, ids: list[int], stop: Sequence[str]):
    """-> (text, ids, hit): text before the first stop string, ids up to the token
    that completes it."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    hits = [(text.find(s), s) for s in stop if s and s in text]
    if not hits:
        return text, ids, False
    at, _ = min(hits)
    for n in range(1, len(ids) + 1):
        if any(s in tokenizer.decode(ids[:n], skip_special_tokens=True) for _, s in hits):
            return text[:at], ids[:n], True
    return text[:at], ids, True


def generate(model: Decoder, tokenizer, prompts: Sequence[Any], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             stop: Sequence[str] | None = None, seed: int = 0, batch_size: int | None = None,
             use_cache: bool = True, num_samples: int = 1) -> GenerationResult:
    """Generates completions for text prompts or chat conversations.

    Args:
      model: Decoder.
      tokenizer: transformers tokenizer (its chat template is applied, with the generation
        prompt, to prompts given as lists of {"role", "content"} messages).
      prompts: strings and/or message lists.
      max_new_tokens, temperature, top_p, top_k, seed, batch_size, use_cache: as in
        `generate_ids`.
      stop: strings; the completion is cut before the first occurrence of any.
      num_samples: G > 1 draws G completions of each prompt with `generate_groups` (the
        prompt prefilled once, finished rows dropped from the batch); the result is then
        prompt-major (entry `i * G + g`) and `batch_size` counts sample rows.
    Returns:
      GenerationResult.
    """
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
        prompts = [prompts]
    prompt_ids = [_encode(tokenizer, p) for p in prompts]
    eos = set(model.cfg.eos_token_id)
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = min(eos) if eos else 0
    if num_samples > 1:
        outs = generate_groups(model, prompt_ids, num_samples=num_samples,
                               max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, top_k=top_k, eos_ids=sorted(eos), pad_id=pad,
                               seed=seed, batch_size=batch_size)
        prompt_ids = [p for p in prompt_ids for _ in range(num_samples)]
    else:
        outs = generate_ids(model, prompt_ids, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, top_k=top_k,
                            eos_ids=sorted(eos), pad_id=pad, seed=seed, batch_size=batch_size,
                            use_cache=use_cache)
    texts, ids_out, reasons = [], [], []
    for ids in outs:
        text, cut, hit = _cut_at_stop(tokenizer, ids, stop or ())
        reason = "stop" if hit else ("eos" if ids and ids[-1] in eos else "length")
        texts.append(text)
        ids_out.append(cut)
        reasons.append(reason)
    return GenerationResult(texts, ids_out, prompt_ids, reasons)
