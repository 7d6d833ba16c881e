"""Every bad-row reason under both policies, with the reported counts asserted."""

import json

import pytest

from mio_jax.data import pipeline, report
from mio_jax.data.config import default_data_config

GOOD = {"prompt": "Add 2 and 3.", "chosen": " 5", "rejected": " 6"}
LONG_PROMPT = {"prompt": "word " * 40, "chosen": " yes", "rejected": " no"}
USER = [{"role": "user", "content": "Hi"}]

# (reason, field named in the error, raw JSONL line) for explicit-format files.
EXPLICIT_BAD = [
    (report.MALFORMED_JSON, None, '{"prompt": "x", "chosen": '),
    (report.NOT_AN_OBJECT, None, "[1, 2, 3]"),
    (report.MISSING_FIELD, "rejected", json.dumps({"prompt": "p", "chosen": " a"})),
    (report.EMPTY_FIELD, "chosen", json.dumps({"prompt": "p", "chosen": "  ", "rejected": " b"})),
    (
        report.NON_STRING_CONTENT,
        "prompt",
        json.dumps({"prompt": 7, "chosen": " a", "rejected": " b"}),
    ),
    (
        report.IDENTICAL_COMPLETIONS,
        "rejected",
        json.dumps({"prompt": "p", "chosen": " a", "rejected": " a"}),
    ),
    (report.NO_COMPLETION_TOKENS, "chosen", json.dumps(LONG_PROMPT)),
]
CHAT_BAD = [
    (
        report.BAD_MESSAGE,
        "chosen",
        json.dumps({"prompt": USER, "chosen": [{"text": "a"}], "rejected": USER}),
    ),
    (
        report.NON_STRING_CONTENT,
        "rejected",
        json.dumps(
            {
                "prompt": USER,
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": ["b"]}],
            }
        ),
    ),
]
KWAY_BAD = [
    (
        report.BAD_SCORES,
        "scores",
        json.dumps({"prompt": "p", "completions": [" a", " b"], "scores": [1]}),
    ),
    (
        report.BAD_SCORES,
        "scores",
        json.dumps({"prompt": "p", "completions": [" a", " b"], "scores": [1, 1]}),
    ),
]


def _config(policy, fmt="explicit", **kw):
    c = default_data_config()
    c.on_bad_row = policy
    c.max_length = 24 if fmt == "explicit" else 64  # ChatML adds a default system message
    for k, v in kw.items():
        c[k] = v
    return c


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _good_line(fmt):
    if fmt == "conversational":
        return json.dumps(
            {
                "prompt": USER,
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            }
        )
    if fmt == "kway":
        return json.dumps({"prompt": "p", "completions": [" a", " b"], "scores": [2, 1]})
    return json.dumps(GOOD)


CASES = (
    [("explicit", c) for c in EXPLICIT_BAD]
    + [("conversational", c) for c in CHAT_BAD]
    + [("kway", c) for c in KWAY_BAD]
)


@pytest.mark.parametrize(
    "fmt,case", CASES, ids=[f"{f}-{c[0]}-{i}" for i, (f, c) in enumerate(CASES)]
)
def test_error_policy_names_file_line_field_and_reason(tmp_path, chatml, fmt, case):
    reason, field, line = case
    path = _write(tmp_path / "rows.jsonl", [_good_line(fmt), line])
    with pytest.raises(report.BadRowError) as err:
        pipeline.prepare(_config("error", fmt), chatml, source=path)
    msg = str(err.value)
    assert f"{path}:2" in msg and reason in msg
    if field:
        assert f"field {field!r}" in msg


@pytest.mark.parametrize(
    "fmt,cases", [("explicit", EXPLICIT_BAD), ("conversational", CHAT_BAD), ("kway", KWAY_BAD)]
)
def test_skip_policy_counts_every_reason(tmp_path, chatml, fmt, cases):
    lines = [_good_line(fmt)]
    for _, _, line in cases:
        lines += [line, _good_line(fmt)]
    path = _write(tmp_path / "rows.jsonl", lines)
    prep = pipeline.prepare(_config("skip", fmt), chatml, source=path)
    s = prep.summary
    expected = {}
    for reason, _, _ in cases:
        expected[reason] = expected.get(reason, 0) + 1
    assert s.dropped == expected
    assert s.rows_read == len(lines) and s.rows_used == len(cases) + 1
    assert s.rows_dropped == len(cases) and s.groups == len(cases) + 1
    # The first row ids are reported, with 1-based line numbers of the bad rows.
    bad_lines = {f"{path}:{2 * i + 2}" for i in range(len(cases))}
    reported = {w.split(",")[0] for ids in s.dropped_examples.values() for w in ids}
    assert reported == bad_lines
    metrics = s.as_metrics()
    for reason, n in expected.items():
        assert metrics[f"data/train/dropped/{reason}"] == n
    assert metrics["data/train/rows_dropped"] == len(cases)
    for reason in expected:
        assert f"{reason}" in s.format_text()


def test_skip_reports_at_most_five_ids(tmp_path, gpt2):
    lines = [json.dumps(GOOD)] + ["{broken"] * 7
    s = pipeline.prepare(_config("skip"), gpt2, source=_write(tmp_path / "r.jsonl", lines)).summary
    assert s.dropped == {report.MALFORMED_JSON: 7}
    assert len(s.dropped_examples[report.MALFORMED_JSON]) == 5


def test_identical_after_truncation_is_dropped(gpt2):
    rows = [
        {"prompt": "p", "chosen": " a", "rejected": " b"},
        {"prompt": "p", "chosen": " alpha beta gamma", "rejected": " alpha beta delta"},
    ]
    s = pipeline.prepare(_config("skip", max_length=3), gpt2, source=rows).summary
    assert s.dropped == {report.IDENTICAL_COMPLETIONS: 1} and s.completion_truncated == 0


def test_all_rows_bad_is_an_error(gpt2):
    with pytest.raises(ValueError, match="no usable row"):
        pipeline.prepare(
            _config("skip"), gpt2, source=[{"prompt": "p", "chosen": " a", "rejected": " a"}]
        )


def test_unrecognisable_first_row_is_a_bad_row(gpt2):
    rows = [{"question": "x", "answer": "y"}, GOOD]
    s = pipeline.prepare(_config("skip"), gpt2, source=rows).summary
    assert s.format == "explicit" and s.dropped == {report.MISSING_FIELD: 1}
    with pytest.raises(report.BadRowError, match=r"rows\[0\].*missing_field.*cannot detect"):
        pipeline.prepare(_config("error"), gpt2, source=rows)
