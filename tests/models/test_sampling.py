"""KV-cache generation: equal to no-cache decoding (greedy and seeded sampling, LoRA and a
quantized base), padding-invariant, stops; the sampling rules; the cache's dtype; the
compiled decode loop copies no weight and no cache."""

import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mio_jax.models import generate, generate_ids, load_pretrained
from mio_jax.models import sampling
from mio_jax.models.sampling import sample_logits
from tiny_checkpoints import tiny_tokenizer, write_case

PROMPTS = [[5, 17, 33, 2, 64, 90, 11, 9, 40], [41, 7], [12, 13, 14, 15, 16]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_pretrained(write_case("qwen3", str(tmp_path_factory.mktemp("ckpt") / "q")))


@pytest.fixture(scope="module")
def greedy(model):
    return generate_ids(model, PROMPTS, max_new_tokens=12)


def test_cache_equals_no_cache(model, greedy):
    assert [len(g) for g in greedy] == [12, 12, 12]
    assert generate_ids(model, PROMPTS, max_new_tokens=12, use_cache=False) == greedy


def test_left_padded_batch_equals_each_prompt_alone(model, greedy):
    alone = generate_ids(model, PROMPTS, max_new_tokens=12, batch_size=1)
    assert alone == greedy


def test_top_k_one_and_tiny_top_p_are_greedy(model, greedy):
    assert generate_ids(model, PROMPTS, max_new_tokens=12, temperature=1.5, top_k=1,
                        seed=3) == greedy
    assert generate_ids(model, PROMPTS, max_new_tokens=12, temperature=1.5, top_p=1e-6,
                        seed=4) == greedy


def test_seeded_sampling_is_reproducible(model, greedy):
    a = generate_ids(model, PROMPTS, max_new_tokens=12, temperature=1.0, seed=7)
    b = generate_ids(model, PROMPTS, max_new_tokens=12, temperature=1.0, seed=7)
    c = generate_ids(model, PROMPTS, max_new_tokens=12, temperature=1.0, seed=8)
    assert a == b
    assert a != c and a != greedy


def test_eos_ends_a_row(model, greedy):
    eos = greedy[0][4]
    out = generate_ids(model, PROMPTS, max_new_tokens=12, eos_ids=[eos])
    for row, full in zip(out, greedy):
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert row == full[:cut]


def test_sample_logits_respects_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    draw = jax.vmap(lambda k, tk, tp: sample_logits(logits, k, 1.0, tk, tp)[0],
                    in_axes=(0, None, None))
    top2 = np.asarray(draw(keys, 2, 1.0))
    assert set(top2.tolist()) == {0, 1}
    assert abs(np.mean(top2 == 0) - 0.5 / 0.8) < 0.08
    nucleus = np.asarray(draw(keys, 0, 0.8))  # 0.5 + 0.3 reach 0.8: token 2 and 3 cut
    assert set(nucleus.tolist()) == {0, 1}
    everything = np.asarray(draw(keys, 0, 1.0))
    assert set(everything.tolist()) == {0, 1, 2, 3}


def _sorted_rule(scaled_bv, top_k, top_p):
    """Top-k then top-p by sorting each row (the textbook rule, as numpy): -inf outside."""
    x = np.asarray(scaled_bv, np.float64)
    out = np.full_like(x, -np.inf)
    for r, row in enumerate(x):
        desc = np.sort(row)[::-1]
        if top_k > 0:
            row = np.where(row < desc[min(top_k, len(row)) - 1], -np.inf, row)
            desc = np.sort(row)[::-1]
        probs = np.exp(desc - desc.max())
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        threshold = desc[before < top_p].min() if top_p < 1 else -np.inf
        out[r] = np.where(row < threshold, -np.inf, row)
    return out


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (20, 1.0), (10, 0.7), (0, 0.5),
                                         (3000, 0.95), (0, 0.99)])
@pytest.mark.parametrize("scale", [0.05, 1.0, 4.0])
def test_the_bisection_cut_equals_the_sorted_rule(top_k, top_p, scale):
    # Flat to peaked rows of a 49k vocabulary (nuclei of a few to tens of thousands of
    # tokens): the kept set is the sorted rule's, entry for entry.
    logits = jax.random.normal(jax.random.key(7), (4, 49152)) * scale
    got = np.asarray(jax.jit(sampling._top_k_and_nucleus)(logits, top_k, top_p))
    want = _sorted_rule(logits, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_array_equal(got[np.isfinite(got)], np.asarray(logits)[np.isfinite(want)])


def test_ties_with_the_smallest_kept_value_stay_in():
    # 100 equal logits and top_p 0.5: half their mass reaches 0.5, and all 100 stay.
    logits = jnp.concatenate([jnp.zeros((1, 100)), jnp.full((1, 50), -30.0),
                              jnp.full((1, 2), 5.0), jnp.full((1, 3), -jnp.inf)], axis=1)
    got = np.asarray(sampling._top_k_and_nucleus(logits, 0, 0.5))
    assert np.isfinite(got).sum() == 2 and np.isfinite(got[0, -5:-3]).all()
    got = np.asarray(sampling._top_k_and_nucleus(logits, 0, 0.999))
    assert np.isfinite(got).sum() == 102
    got = np.asarray(sampling._top_k_and_nucleus(logits, 4, 1.0))  # 3rd..102nd tie: kept
    assert np.isfinite(got).sum() == 102
    np.testing.assert_array_equal(got, _sorted_rule(logits, 4, 1.0))


def test_draws_follow_the_cut_rows_probabilities():
    logits = jax.random.normal(jax.random.key(12), (2, 1000)) * 4.0
    want = np.asarray(jax.nn.softmax(jnp.asarray(_sorted_rule(logits, 10, 0.8)), axis=-1))
    keys = jax.random.split(jax.random.key(8), 4000)
    got = np.asarray(jax.jit(jax.vmap(lambda k: sample_logits(logits, k, 1.0, 10, 0.8)))(keys))
    for row in range(2):
        freq = np.bincount(got[:, row], minlength=1000) / len(keys)
        assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(want[row]))
        assert abs(freq - want[row]).sum() < 0.1


def test_text_chat_prompts_and_stop_strings(model):
    tok = tiny_tokenizer()
    chat = [{"role": "user", "content": "Hi there"}]
    prompts = ["The cat sat", chat]
    res = generate(model, tok, prompts, max_new_tokens=10)
    templ = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert res.prompt_token_ids[1] == tok(templ, add_special_tokens=False)["input_ids"]
    assert res.prompt_token_ids[0] == tok("The cat sat")["input_ids"]
    assert res.token_ids == generate_ids(model, res.prompt_token_ids, max_new_tokens=10,
                                         eos_ids=[2], pad_id=0)
    full = res.texts[0]
    assert res.finish_reasons[0] in ("length", "eos")
    stop = full[3:5]
    first = full.find(stop)
    stopped = generate(model, tok, prompts, max_new_tokens=10, stop=[stop, "never-appears"])
    assert stopped.texts[0] == full[:first]
    assert stopped.finish_reasons[0] == "stop"
    assert stop in tok.decode(stopped.token_ids[0])
    assert stop not in tok.decode(stopped.token_ids[0][:-1])
    assert res.token_ids[0][:len(stopped.token_ids[0])] == stopped.token_ids[0]


def test_sharded_generation_equals_unsharded(tmp_path, greedy):
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    sharded = load_pretrained(write_case("qwen3", str(tmp_path / "q")), mesh=mesh)
    with jax.set_mesh(mesh):
        assert generate_ids(sharded, PROMPTS, max_new_tokens=12) == greedy


def test_seeded_sampling_with_the_cache_equals_without(model):
    for kw in (dict(temperature=0.9, seed=5), dict(temperature=1.3, top_k=7, seed=6),
               dict(temperature=1.1, top_p=0.8, seed=9),
               dict(temperature=0.7, top_k=20, top_p=0.95, seed=2)):
        cached = generate_ids(model, PROMPTS, max_new_tokens=12, **kw)
        assert generate_ids(model, PROMPTS, max_new_tokens=12, use_cache=False, **kw) == cached
        assert all(len(c) == 12 for c in cached), kw


def test_greedy_is_the_argmax_whatever_top_k_and_top_p_say():
    logits = jax.random.normal(jax.random.key(1), (5, 300)) * 3.0
    want = np.argmax(np.asarray(logits), axis=-1)
    for top_k, top_p in ((0, 1.0), (3, 1.0), (0, 0.5), (10, 0.9)):
        got = jax.jit(sample_logits)(logits, jax.random.key(2), 0.0, top_k, top_p)
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(got), want)


def test_plain_temperature_sampling_is_the_gumbel_max_draw_of_the_scaled_logits():
    logits = jax.random.normal(jax.random.key(3), (4, 500))
    key = jax.random.key(4)
    got = jax.jit(sample_logits)(logits, key, 0.7, 0, 1.0)
    want = jax.random.categorical(key, logits / 0.7, axis=-1)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not np.array_equal(np.asarray(got), np.argmax(np.asarray(logits), -1))


def _primitives(jaxpr) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names |= _primitives(sub)
    return names


def test_no_rule_sorts_the_vocabulary():
    """Greedy is an argmax, plain temperature sampling a draw of the scaled row, and top-k /
    top-p cut the row among its largest entries (a top_k) or by bisection (a loop of passes
    over it): nothing sorts a row, in the program or in what XLA compiles from it (a full
    sort of every row was most of a decode step at a 49k vocabulary on a CPU; XLA:CPU
    turns a top_k whose values are sliced into one)."""
    jaxpr = jax.make_jaxpr(sample_logits)(jnp.zeros((2, 50)), jax.random.key(0), 1.0, 0, 1.0)
    assert "sort" not in _primitives(jaxpr.jaxpr)
    (top,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"]
    sampled, greedy = (b.jaxpr for b in top.params["branches"])  # (false, true)
    assert "argmax" in _primitives(greedy)
    (inner,) = [e for e in sampled.eqns if e.primitive.name == "cond"]
    plain, truncated = (b.jaxpr for b in inner.params["branches"])
    loops = {"while", "scan"}
    assert not loops & _primitives(plain) and loops & _primitives(truncated)
    assert "top_k" in _primitives(truncated)
    hlo = jax.jit(sample_logits).lower(jnp.zeros((4, 49152)), jax.random.key(0), 0.8, 0,
                                       0.95).compile().as_text()
    assert " sort(" not in hlo


@pytest.mark.parametrize("top_k,top_p", [(0, 0.95), (50, 1.0), (20, 0.9), (0, 0.5)])
def test_the_candidate_cut_draws_what_the_whole_row_draws(top_k, top_p):
    """Rows peaked enough for their cut to lie among their largest entries draw, token for
    token, what the bisection cut of the whole row draws with the same keys (one key per
    row, or one for the batch); a flat row is left to the bisection unless a top-k
    cut (of fewer than CANDIDATES entries) bounds its nucleus."""
    whole = jax.jit(lambda x, k: sampling._draw(sampling._top_k_and_nucleus(x, top_k, top_p),
                                                k))
    fast = jax.jit(lambda x, k: sampling._draw_truncated(x, k, top_k, top_p))
    cut = jax.jit(lambda x: sampling._candidate_cut(x, top_k, top_p)[3])
    taken = 0
    for seed, scale in ((0, 4.0), (1, 8.0), (2, 8.0)):
        x = jax.random.normal(jax.random.key(seed), (16, 49152)) * scale
        ok = np.asarray(cut(x))
        taken += ok.all()
        for key in (sampling._row_keys(jax.random.key(10 + seed), jnp.arange(16, dtype=jnp.uint32)),
                    jax.random.key(20 + seed)):
            np.testing.assert_array_equal(np.asarray(fast(x, key)), np.asarray(whole(x, key)))
    assert taken >= 2  # the candidate path ran
    flat = jax.random.normal(jax.random.key(3), (2, 49152)) * 0.1
    assert np.asarray(cut(flat)).tolist() == [top_k > 0] * 2


def test_cache_is_in_the_compute_dtype(tmp_path):
    bf16 = load_pretrained(write_case("llama3", str(tmp_path / "l")), dtype="bfloat16")
    cache = bf16.init_cache(2, 16)
    assert all(a.dtype == jnp.bfloat16 for a in cache["k"] + cache["v"])
    assert cache["k"][0].shape == (2, bf16.cfg.num_key_value_heads, 16, bf16.cfg.head_dim)
    ids = jnp.asarray([[3, 4, 5], [6, 7, 8]], jnp.int32)
    logits, cache = bf16.decode(ids, jnp.asarray([[0, 1, 2]] * 2), jnp.ones((2, 3), bool), cache)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 3, bf16.cfg.vocab_size)
    assert all(a.dtype == jnp.bfloat16 for a in cache["k"] + cache["v"])
    assert int(cache["index"]) == 3
    assert float(jnp.abs(cache["k"][1][:, :, :3].astype(jnp.float32)).max()) > 0
    assert float(jnp.abs(cache["k"][1][:, :, 3:].astype(jnp.float32)).max()) == 0
    # float32 master weights, bfloat16 compute: the cache follows the compute dtype
    mixed = load_pretrained(str(tmp_path / "l"), dtype="bfloat16", param_dtype="float32")
    assert mixed.init_cache(1, 8)["v"][0].dtype == jnp.bfloat16
    out = generate_ids(mixed, PROMPTS, max_new_tokens=6)
    assert [len(o) for o in out] == [6, 6, 6]


def test_decode_steps_equal_the_full_forward(model):
    """Prefill then one token at a time: each step's logits equal the full forward's at
    that position (left padding included)."""
    ids = jnp.asarray([[0, 0, 5, 17, 33, 2], [12, 13, 14, 15, 16, 9]], jnp.int32)
    valid = ids != 0
    full = np.asarray(model(ids, attention_mask=valid.astype(jnp.int32)))
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    cache = model.init_cache(2, 8)
    weights = model.decode_weights()
    logits, cache = model.decode(ids[:, :4], positions[:, :4], valid[:, :4], cache, weights)
    np.testing.assert_allclose(np.asarray(logits)[:, 2:], full[:, 2:4], atol=1e-5)
    for t in (4, 5):
        logits, cache = model.decode(ids[:, t:t + 1], positions[:, t:t + 1],
                                     valid[:, t:t + 1], cache, weights)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=1e-5)
    last, _ = model.decode(ids, positions, valid, model.init_cache(2, 8), last_only=True)
    np.testing.assert_allclose(np.asarray(last)[:, 0], full[:, -1], atol=1e-5)


def test_lora_and_quantized_base_decode_like_the_full_forward(tmp_path):
    from mio_jax.models import lora, lora_decoder, quant

    folder = write_case("llama3", str(tmp_path / "l"))
    spec = lora.make_spec(rank=4, alpha=8, target_modules="q_proj,v_proj,down_proj",
                          num_layers=2, layers_to_transform=(1,))
    m = load_pretrained(folder, lora=spec)
    rng = np.random.default_rng(0)
    values = jax.tree.map(lambda a: rng.standard_normal(a.shape) * 0.3,
                          nnx.to_pure_dict(nnx.state(m, nnx.LoRAParam)))
    lora_decoder.set_adapters(m, values)
    graphdef, lora_state, rest = nnx.split(m, nnx.LoRAParam, ...)
    base = quant.quantize_base(nnx.to_pure_dict(rest), m.cfg, "nf4", None, None)
    nnx.replace_by_pure_dict(rest, base)
    quantized = nnx.merge(graphdef, lora_state, rest)
    for mdl in (m, quantized):
        cached = generate_ids(mdl, PROMPTS, max_new_tokens=10)
        assert generate_ids(mdl, PROMPTS, max_new_tokens=10, use_cache=False) == cached
    assert generate_ids(m, PROMPTS, max_new_tokens=10) != generate_ids(
        load_pretrained(folder), PROMPTS, max_new_tokens=10)  # the adapters take part


def _computation(hlo: str, name: str) -> list[str]:
    lines = hlo.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(name + " "))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("}"))
    return lines[start + 1:end]


def _run_by(hlo: str, name: str) -> list[str]:
    """The instructions of computation `name` and of the loops, branches and calls in it
    (not the insides of fusions: those write no buffers of their own)."""
    out = []
    for line in _computation(hlo, name):
        out.append(line)
        refs = re.findall(r"(?:body|to_apply)=(%[\w.\-]+)", line)
        branches = re.search(r"branch_computations=\{([^}]*)\}", line)
        if branches:
            refs += re.findall(r"%[\w.\-]+", branches.group(1))
        for ref in refs:
            out += _run_by(hlo, ref)
    return out


def test_a_decode_step_copies_no_weight_and_no_cache():
    """In the compiled decode loop nothing but the in-place cache update writes a
    buffer the size of a layer's weight or cache (slicing the layer stacks inside the
    loop used to copy every weight, and every layer's cache, on every token)."""
    from mio_jax.models import init_model, sampling
    from mio_jax.testing import tiny_model_config

    cfg = tiny_model_config(vocab_size=200, hidden_size=40, intermediate_size=80,
                            num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=12)
    graphdef, state = nnx.split(init_model(cfg))
    B, P, n_new = 2, 8, 8
    ids = jnp.ones((B, P), jnp.int32)
    hlo = sampling._generate_padded.lower(
        graphdef, state, ids, ids, jnp.int32(n_new), jax.random.key(0), jnp.float32(0),
        jnp.int32(0), jnp.float32(1), jnp.asarray([2]), jnp.int32(0), n_new=n_new,
        use_cache=True).compile().as_text()
    loop = next(line for line in hlo.splitlines()
                if " while(" in line and f"s32[{B},{n_new}]" in line)
    body = _run_by(hlo, re.search(r"body=(%[\w.\-]+)", loop).group(1))
    weight_sizes = {40 * 48, 40 * 24, 40 * 80, 200 * 40}  # q/o, k/v, gate/up/down, embed
    cache_size = B * 2 * (P + n_new) * 12
    updates = 0
    for line in body:
        if " = " not in line or line.split(" = ")[1].split("(")[0].split(" ")[-1] in (
                "parameter", "get-tuple-element", "bitcast", "tuple"):
            continue
        shape = line.split(" = ")[1].split("{")[0].split(" ")[0]
        if not shape.startswith("f32["):
            continue
        size = int(np.prod([int(d) for d in shape[4:-1].split(",") if d]))
        assert size not in weight_sizes, line
        if size == cache_size:
            assert "dynamic-update-slice" in line and " copy(" not in line, line
            updates += 1
    assert updates == 2 * cfg.num_hidden_layers  # each layer's k and v, written in place


# ---- rollouts: the prompt's cache shared by its samples, finished rows dropped ----------

EOS = list(range(3, 40))  # a tenth of the tiny vocabulary ends a row: lengths spread widely


def test_grouped_greedy_samples_equal_the_static_sampler(model):
    static = generate_ids(model, PROMPTS, max_new_tokens=24, eos_ids=EOS)
    assert len({len(x) for x in static}) > 1  # rows end at different steps
    groups = sampling.generate_groups(model, PROMPTS, num_samples=3, max_new_tokens=24,
                                      eos_ids=EOS, chunk_steps=2)
    assert groups == [s for s in static for _ in range(3)]


def test_grouped_sampling_ignores_batching_and_compaction(model, monkeypatch):
    prompts = PROMPTS * 2  # 6 prompts
    kw = dict(num_samples=4, max_new_tokens=24, temperature=1.5, eos_ids=EOS, seed=11)
    once = sampling.generate_groups(model, prompts, chunk_steps=64, **kw)  # one chunk: no compaction
    lengths = [len(x) for x in once]
    assert len(set(lengths)) >= 5 and max(lengths) > 4 * min(lengths)
    rows, decode = [], sampling._decode_ring

    def counted(graphdef, state, rows_state, *args):
        rows.append(rows_state[0].shape[0])
        return decode(graphdef, state, rows_state, *args)

    monkeypatch.setattr(sampling, "_decode_ring", counted)
    compacted = sampling.generate_groups(model, prompts, chunk_steps=3, **kw)
    all_at_once, rows[:] = list(rows), []
    refilled = sampling.generate_groups(model, prompts, chunk_steps=2, batch_size=8, **kw)
    monkeypatch.undo()
    # all 24 rows at once, then fewer as they end
    assert all_at_once[0] == 24 and min(all_at_once) <= 8 and len(set(all_at_once)) >= 2
    # 8 rows: full while samples wait (24 samples in 8 rows: the rows that ended take the
    # next ones, at least 3 fills)
    assert rows[:3] == [8, 8, 8]
    assert refilled == once and compacted == once
    # a prompt's samples are draws, not copies; the same seed draws the same samples
    assert len({tuple(x) for x in once[:4]}) > 1
    assert sampling.generate_groups(model, prompts, chunk_steps=3, **{**kw, "seed": 12}) != once


def test_shared_prompt_cache_equals_one_prefill_per_sample(model):
    """G samples of a prompt from one prefill (its cache repeated to G rows) equal G copies
    of the prompt prefilled row by row (num_samples=1): a sample's key is its index either
    way, so seeded sampling draws the same tokens."""
    kw = dict(max_new_tokens=20, temperature=1.2, top_p=0.9, eos_ids=EOS, seed=5)
    shared = sampling.generate_groups(model, PROMPTS, num_samples=4, **kw)
    copies = [p for p in PROMPTS for _ in range(4)]
    assert shared == sampling.generate_groups(model, copies, num_samples=1, **kw)


def test_generate_with_num_samples_returns_prompt_major_texts(model):
    tok = tiny_tokenizer()
    out = generate(model, tok, ["a b", "c"], max_new_tokens=6, num_samples=2, temperature=1.0,
                   seed=3, batch_size=4)
    assert len(out.texts) == 4 and out.prompt_token_ids[0] == out.prompt_token_ids[1]
    ids = sampling.generate_groups(model, out.prompt_token_ids[::2], num_samples=2,
                                   max_new_tokens=6, temperature=1.0, seed=3,
                                   eos_ids=sorted(set(model.cfg.eos_token_id) |
                                                  {tok.eos_token_id} - {None}),
                                   pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
    assert out.token_ids == ids
