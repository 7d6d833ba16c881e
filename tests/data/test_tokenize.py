"""Token ids, boundaries and masks of every format against the tokenizer's own output."""

import collections
import copy

import numpy as np
import pytest

from mio_jax.data import batching, formats, pipeline, report
from mio_jax.data.config import default_data_config
from mio_jax.data.tokenize import tokenize_group

SYSTEM = {"role": "system", "content": "You are terse."}
USER = {"role": "user", "content": "What is 2 + 3?"}
GOOD = {"role": "assistant", "content": "2 + 3 = 5. The answer is 5."}
BAD = {"role": "assistant", "content": "2 + 3 = 6. The answer is 6."}


def _config(**kw):
    c = default_data_config()
    for k, v in kw.items():
        c[k] = v
    return c


def _ids(tok, text, special=True):
    return list(tok(text, add_special_tokens=special)["input_ids"])


def _check_batch(batch, group, b=0):
    """The [B, K, L] conventions for group `group` at batch row b."""
    P = len(group.prompt_ids)
    for k, c in enumerate(group.completion_ids):
        seq = np.concatenate([group.prompt_ids, c])
        n = len(seq)
        np.testing.assert_array_equal(batch.input_ids[b, k, :n], seq)
        np.testing.assert_array_equal(batch.targets[b, k, : n - 1], seq[1:])
        mask = np.zeros(batch.input_ids.shape[-1], np.int32)
        mask[P - 1 : n - 1] = 1
        np.testing.assert_array_equal(batch.loss_mask[b, k], mask)
        assert batch.loss_mask[b, k].sum() == len(c)
        # The first masked target is the first completion token; the last is EOS.
        assert batch.targets[b, k, P - 1] == c[0]
        np.testing.assert_array_equal(batch.positions[b, k, :n], np.arange(n))
        assert batch.attention_mask[b, k].sum() == n


def test_explicit_gpt2_matches_concatenated_text(gpt2):
    rows = [{"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " London."}]
    prep = pipeline.prepare(_config(), gpt2, source=rows)
    g = prep.groups[0]
    assert prep.summary.format == "explicit"
    assert (
        g.prompt_ids.tolist()
        == _ids(gpt2, "The capital of France is")
        == [464, 3139, 286, 4881, 318]
    )
    eos = gpt2.eos_token_id
    assert eos == 50256
    assert g.prompt_ids.tolist() + g.completion_ids[0].tolist() == _ids(
        gpt2, "The capital of France is Paris."
    ) + [eos]
    assert g.prompt_ids.tolist() + g.completion_ids[1].tolist() == _ids(
        gpt2, "The capital of France is London."
    ) + [eos]
    assert g.completion_ids[0].tolist() == [6342, 13, eos]
    batch = batching.collate([g], np.array([0]), K=2, L=12)
    _check_batch(batch, g)


def test_boundary_merge_keeps_full_text_tokens_and_warns(gpt2):
    # "Hello wor" + "ld": GPT-2 merges " world" across the boundary.
    rows = [{"prompt": "Hello wor", "chosen": "ld", "rejected": "m"}]
    prep = pipeline.prepare(_config(), gpt2, source=rows)
    g = prep.groups[0]
    assert prep.summary.warnings == {report.BOUNDARY_MERGE: 2}
    eos = gpt2.eos_token_id
    for text, c in (("Hello world", g.completion_ids[0]), ("Hello worm", g.completion_ids[1])):
        assert g.prompt_ids.tolist() + c.tolist() == _ids(gpt2, text) + [eos]
    assert g.prompt_ids.tolist() == [15496]  # the straddling token went to the completion
    assert g.completion_ids[0].tolist() == [995, eos]


def test_implicit_prompt_split_at_longest_common_token_prefix(gpt2):
    rows = [{"chosen": "Q: what is 2+2? A: four", "rejected": "Q: what is 2+2? A: five"}]
    prep = pipeline.prepare(_config(), gpt2, source=rows)
    g = prep.groups[0]
    assert prep.summary.format == "implicit"
    a, b = _ids(gpt2, rows[0]["chosen"]), _ids(gpt2, rows[0]["rejected"])
    n = next(i for i in range(len(a)) if a[i] != b[i])
    assert g.prompt_ids.tolist() == a[:n]
    assert g.completion_ids[0].tolist() == a[n:] + [gpt2.eos_token_id]
    assert g.completion_ids[1].tolist() == b[n:] + [gpt2.eos_token_id]
    assert len(g.completion_ids[0]) == 2  # " four" + EOS


@pytest.mark.parametrize("name", ["chatml", "smollm2"])
def test_conversational_chat_template(name, request):
    tok = request.getfixturevalue(name)
    rows = [{"prompt": [SYSTEM, USER], "chosen": [GOOD], "rejected": [BAD]}]
    prep = pipeline.prepare(_config(), tok, source=rows)
    g = prep.groups[0]
    assert prep.summary.format == "conversational" and not prep.summary.warnings
    prompt_text = tok.apply_chat_template(
        [SYSTEM, USER], tokenize=False, add_generation_prompt=True
    )
    assert g.prompt_ids.tolist() == _ids(tok, prompt_text, special=False)
    eos = tok.eos_token_id
    assert tok.convert_ids_to_tokens(eos) == "<|im_end|>"
    for c, answer in zip(g.completion_ids, (GOOD, BAD)):
        full = _ids(
            tok, tok.apply_chat_template([SYSTEM, USER, answer], tokenize=False), special=False
        )
        # ChatML ends a turn with "<|im_end|>\n": the completion stops at EOS, once.
        assert g.prompt_ids.tolist() + c.tolist() == full[:-1]
        assert tok.decode(full[-1:]) == "\n"
        assert c.tolist().count(eos) == 1 and c[-1] == eos
        assert tok.decode(c) == answer["content"] + "<|im_end|>"
    if name == "smollm2":  # no BOS added, none duplicated: the text starts with one <|im_start|>
        assert g.prompt_ids[0] == 1 and g.prompt_ids[1] != 1
    batch = batching.collate([g], np.array([0]), K=2, L=80)
    _check_batch(batch, g)


def test_implicit_conversation_splits_at_message_boundary(smollm2):
    rows = [{"chosen": [SYSTEM, USER, GOOD], "rejected": [SYSTEM, USER, BAD]}]
    g = pipeline.prepare(_config(), smollm2, source=rows).groups[0]
    explicit = pipeline.prepare(
        _config(), smollm2, source=[{"prompt": [SYSTEM, USER], "chosen": [GOOD], "rejected": [BAD]}]
    ).groups[0]
    assert g.prompt_ids.tolist() == explicit.prompt_ids.tolist()
    for a, b in zip(g.completion_ids, explicit.completion_ids):
        assert a.tolist() == b.tolist()
    # Token-wise the two answers share "2 + 3 = ", but the split is at the message.
    assert smollm2.decode(g.completion_ids[1][:3]).startswith("2")


def test_system_prompt_added_when_missing(chatml):
    rows = [{"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}]
    g = pipeline.prepare(_config(system_prompt="You are terse."), chatml, source=rows).groups[0]
    text = chatml.apply_chat_template([SYSTEM, USER], tokenize=False, add_generation_prompt=True)
    assert g.prompt_ids.tolist() == _ids(chatml, text, special=False)


def test_kway_modes(gpt2):
    row = {"prompt": "Pick:", "completions": [" b", " a", " d", " c"], "scores": [3, 4, 1, 2]}

    def prep(mode, **kw):
        return pipeline.prepare(_config(format="kway", kway_mode=mode, **kw), gpt2, source=[row])

    dec = lambda g: [gpt2.decode(c[:-1]) for c in g.completion_ids]
    each = prep("best_vs_each")
    assert [dec(g) for g in each.groups] == [[" a", " b"], [" a", " c"], [" a", " d"]]
    assert each.K == 2 and each.summary.rows_used == 1 and each.summary.groups == 3
    assert [dec(g) for g in prep("best_vs_worst").groups] == [[" a", " d"]]
    group = prep("group", num_negatives=2)
    assert group.K == 3 and [dec(g) for g in group.groups] == [[" a", " b", " c"]]
    # Ranks (1 = best) and per-completion dict scores give the same groups.
    ranked = {"prompt": "Pick:", "completions": [" b", " a", " d", " c"], "ranks": [2, 1, 4, 3]}
    dicts = {
        "prompt": "Pick:",
        "completions": [{"text": t, "score": s} for t, s in zip(row["completions"], row["scores"])],
    }
    ultrafeedback = {
        "instruction": "Pick:",
        "completions": [
            {"model": "m", "response": t, "overall_score": s}
            for t, s in zip(row["completions"], row["scores"])
        ],
    }
    for other in (ranked, dicts, ultrafeedback):
        got = pipeline.prepare(_config(kway_mode="best_vs_each"), gpt2, source=[other])
        assert [dec(g) for g in got.groups] == [dec(g) for g in each.groups]
    # A 4-slot group with only 2 worse completions pads slot 3 as invalid.
    g4 = prep("group", num_negatives=3)
    batch = batching.collate(g4.groups, np.array([0]), K=4, L=8)
    assert batch.valid.tolist() == [[True, True, True, True]]
    g5 = prep("group", num_negatives=4)
    batch = batching.collate(g5.groups, np.array([0]), K=5, L=8)
    assert batch.valid.tolist() == [[True, True, True, True, False]]
    assert batch.attention_mask[0, 4].sum() == 0 and batch.loss_mask[0, 4].sum() == 0


def test_truncation_modes(gpt2):
    prompt = "one two three four five six seven eight"
    P = _ids(gpt2, prompt)
    assert len(P) == 8
    row = [{"prompt": prompt, "chosen": " nine ten eleven", "rejected": " zero"}]
    start = pipeline.prepare(
        _config(max_prompt_length=3, truncation_mode="keep_start", max_length=6), gpt2, source=row
    )
    g = start.groups[0]
    assert g.prompt_ids.tolist() == P[:3]
    C = _ids(gpt2, prompt + " nine ten eleven")[8:] + [gpt2.eos_token_id]
    assert g.completion_ids[0].tolist() == C[:3]  # cut from the end to max_length - 3
    assert g.completion_ids[1].tolist() == _ids(gpt2, prompt + " zero")[8:] + [gpt2.eos_token_id]
    assert start.summary.prompt_truncated == 1 and start.summary.completion_truncated == 1
    end = pipeline.prepare(
        _config(max_prompt_length=3, truncation_mode="keep_end", max_length=20), gpt2, source=row
    )
    assert end.groups[0].prompt_ids.tolist() == P[-3:]
    assert end.summary.completion_truncated == 0


def test_keep_end_keeps_bos(smollm2):
    rows = [{"prompt": [SYSTEM, USER], "chosen": [GOOD], "rejected": [BAD]}]
    full = pipeline.prepare(_config(), smollm2, source=rows).groups[0].prompt_ids.tolist()
    g = pipeline.prepare(_config(max_prompt_length=6), smollm2, source=rows).groups[0]
    assert g.prompt_ids.tolist() == [full[0]] + full[-5:] and full[0] == smollm2.bos_token_id


def test_duplicate_bos_removed_and_counted(smollm2):
    # A template that writes BOS while the text also starts with it.
    group = formats.Group("r", "<|im_start|>Q", ("A", "B"), chat=False)
    warnings = collections.Counter()
    tok = smollm2
    t = tokenize_group(
        tok,
        formats.Group("r", "<|im_start|><|im_start|>Q", ("A", "B"), False),
        max_length=32,
        log=report.BadRowLog(),
        warnings=warnings,
    )
    ref = tokenize_group(
        tok, group, max_length=32, log=report.BadRowLog(), warnings=collections.Counter()
    )
    assert warnings[report.DUPLICATE_BOS] == 2
    assert t.prompt_ids.tolist() == ref.prompt_ids.tolist()
    assert t.prompt_ids.tolist().count(tok.bos_token_id) == 1


def test_explicit_text_on_smollm2_no_bos_added(smollm2):
    rows = [{"prompt": "Question: 12 + 30 =", "chosen": " 42", "rejected": " 43"}]
    g = pipeline.prepare(_config(), smollm2, source=rows).groups[0]
    eos = smollm2.eos_token_id
    assert g.prompt_ids.tolist() == _ids(smollm2, "Question: 12 + 30 =")
    for c, text in zip(g.completion_ids, ("Question: 12 + 30 = 42", "Question: 12 + 30 = 43")):
        assert g.prompt_ids.tolist() + c.tolist() == _ids(smollm2, text) + [eos]
    # SmolLM2 splits digits: " 42" is " ", "4", "2", then EOS.
    assert [smollm2.decode([t]) for t in g.completion_ids[0][:-1]] == [" ", "4", "2"]
    assert smollm2.bos_token_id not in g.prompt_ids.tolist()


def test_kway_conversational_group(smollm2):
    answers = [{"role": "assistant", "content": f"The answer is {n}."} for n in (5, 6, 7)]
    row = {
        "prompt": [SYSTEM, USER],
        "completions": [[answers[1]], [answers[0]], [answers[2]]],
        "scores": [0.5, 1.0, 0.1],
    }
    prep = pipeline.prepare(_config(kway_mode="group", num_negatives=2), smollm2, source=[row])
    g = prep.groups[0]
    assert prep.K == 3 and prep.summary.format == "kway"
    prompt_text = smollm2.apply_chat_template(
        [SYSTEM, USER], tokenize=False, add_generation_prompt=True
    )
    assert g.prompt_ids.tolist() == _ids(smollm2, prompt_text, special=False)
    for c, answer in zip(g.completion_ids, (answers[0], answers[1], answers[2])):
        full = _ids(
            smollm2,
            smollm2.apply_chat_template([SYSTEM, USER, answer], tokenize=False),
            special=False,
        )
        assert g.prompt_ids.tolist() + c.tolist() == full[:-1]
    batch = batching.collate([g], np.array([0]), K=3, L=64)
    _check_batch(batch, g)


def test_template_that_renders_the_prompt_differently_warns(chatml):
    tok = copy.deepcopy(chatml)
    # The generation prompt says "Assistant:", the rendered conversation "assistant: ".
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    )
    rows = [{"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}]
    prep = pipeline.prepare(_config(), tok, source=rows)
    assert prep.summary.warnings == {report.TEMPLATE_PREFIX: 2}
    g = prep.groups[0]
    assert tok.decode(g.prompt_ids) == "user: What is 2 + 3?\n"
    for c, answer in zip(g.completion_ids, (GOOD, BAD)):
        full = _ids(tok, tok.apply_chat_template([USER, answer], tokenize=False), special=False)
        assert g.prompt_ids.tolist() + c.tolist() == full + [tok.eos_token_id]
