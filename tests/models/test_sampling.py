"""KV-cache generation: equal to no-cache decoding, padding-invariant, stops, seeded sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mio_jax.models import generate, generate_ids, load_pretrained
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
