"""The data inspection report and command."""

import os
import subprocess
import sys

import numpy as np

from mio_jax.data import inspect as data_inspect
from mio_jax.data import pipeline
from mio_jax.data.config import default_data_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROWS = [
    {
        "prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
        "chosen": [{"role": "assistant", "content": f"The answer is {i + 1}."}],
        "rejected": [{"role": "assistant", "content": f"The answer is {i + 2}."}],
    }
    for i in range(10)
]


def test_render_marks_exactly_the_loss_tokens(chatml):
    c = default_data_config()
    prep = pipeline.prepare(c, chatml, source=ROWS)
    text = data_inspect.report_text(prep, chatml, c, examples=1, batch_size=4)
    assert "rows read=10 used=10 dropped=0" in text
    assert "prompt tokens: min" in text and "padding efficiency (bucketed, batch 4)" in text
    assert (
        "user\nWhat is 0 + 1?<|im_end|>\n<|im_start|>assistant\n⟦The answer is 1.<|im_end|>⟧"
        in text
    )
    assert "⟦The answer is 2.<|im_end|>⟧" in text and text.count("⟦") == 3  # + the legend
    g = prep.groups[0]
    assert f"[chosen] {len(g.completion_ids[0])} loss tokens" in text


def test_histogram_counts():
    text = data_inspect.histogram(np.array([1, 1, 1, 5]), bins=2, width=6, title="x")
    assert text.splitlines() == [
        "x: min 1 mean 2.0 max 5",
        "      1-3     | ###### 3",
        "      3-5     | ##     1",
    ]


def test_command_line(tmp_path, chatml):
    chatml.save_pretrained(tmp_path / "tok")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(__import__("json").dumps(r) for r in ROWS) + "\n{bad\n")
    cfg = tmp_path / "cfg.py"
    cfg.write_text(
        "from mio_jax.data.config import default_data_config\n"
        "def get_config():\n"
        "    c = default_data_config()\n"
        f"    c.train_path = {str(data)!r}\n"
        "    c.on_bad_row = 'skip'\n"
        "    return c\n"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mio_jax.data.inspect",
            f"--config={cfg}",
            f"--tokenizer={tmp_path / 'tok'}",
            "--examples=1",
            "--config.max_length=64",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "rows read=11 used=10 dropped=1" in out.stdout
    assert f"dropped 1 x malformed_json (first: {data}:11)" in out.stdout
    assert "max_length=64" in out.stdout and "⟦The answer is 1.<|im_end|>⟧" in out.stdout
