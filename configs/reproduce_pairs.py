"""On-policy K-way groups for the small-scale reproduction (launch/reproduce_small.sh).

SmolLM2-135M-Instruct samples K = 4 answers per prompt to easy reasoning-gym arithmetic
(basic_arithmetic with single-digit operands and 2-3 terms: at the default difficulty it gets almost
nothing right, and chain_sum at this difficulty gave too few correct samples for the CPU budget),
reasoning-gym's own checker scores them, and every prompt with at least one correct and one
incorrect sample becomes a K-way row (first correct sample, then the distinct incorrect ones).
The trainer turns the same rows into pairs (`data.kway_mode = "best_vs_worst"`) or groups.

  python -m mio_jax.pairs --config=configs/reproduce_pairs.py --out=/tmp/groups.jsonl.gz
"""

import json

import ml_collections

# Single-digit operands, 2-3 terms: SmolLM2-135M gets a fraction of these right.
TASK_CONFIG = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}
TASKS = "basic_arithmetic"


def get_config():
    """The pairs builder's settings (keys of `mio_jax.pairs.default_config()`)."""
    c = ml_collections.ConfigDict()
    c.model = ""                      # the embedded SmolLM2-135M-Instruct GGUF
    c.tasks = TASKS
    c.task_config = json.dumps(TASK_CONFIG)
    c.num_prompts = 48                # per task
    c.seed = 0                        # training item seeds 0..47 (held-out eval uses >= 1e9)
    c.sample_seed = 0
    c.num_samples = 4                 # K
    c.temperature = 0.8
    c.top_p = 0.95
    c.max_new_tokens = 80
    c.batch_size = 8                  # prompts per sampler call (32 sequences)
    c.mode = "group"
    c.num_negatives = 0               # keep every distinct incorrect sample
    c.out = "workdirs/reproduce_small/pairs/groups.jsonl.gz"
    return c
