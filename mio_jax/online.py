"""Online training: rounds of sample -> verify -> pair -> train with the policy itself.

``python -m mio_jax.main --config=configs/online.py`` runs ``online.rounds`` rounds. Round r:

  1. prompts: ``online.prompts_per_round`` problems per reasoning-gym task (item seeds
     ``prompt_seed + r*M`` on, below the held-out range) and/or the next M rows of a JSONL;
  2. samples: K answers per prompt from the current policy (the train state's own sharded
     weights, merged into the model in memory: no export, no reload), scored by the verifier;
  3. pairs: prompts whose K answers are all correct or all incorrect give no row; the others
     give the best vs the worst answer, every correct x incorrect pair, or one K-way group;
  4. reference: the log-probs of the round's rows under the initial model (for LoRA, the base
     with the adapters off) or under the policy at the round's start, computed once;
  5. train: ``online.steps_per_round`` optimizer steps on the round's rows (shuffled,
     repeated as needed), with any loss; then a checkpoint, the round's metrics and, every
     ``online.eval_every_rounds``, the held-out eval.

Every round's files live in ``<workdir>/online/round_<r>/``: prompts.jsonl, samples.jsonl
(each answer with its score, token count and finish reason), pairs.jsonl, reference and
policy log-prob caches, and done.json (the round's metrics). A resumed run re-reads them:
killed while sampling, the round samples again from the checkpoint at its start (the same
weights and seeds: the same samples); killed while training, it continues from the last
checkpoint with the round's data position. Either way it ends as an uninterrupted run does.
The per-round metrics are also rows of ``metrics.jsonl`` with split "round".
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx

from mio_jax import config as mio_config
from mio_jax import distributed
from mio_jax import heldout
from mio_jax import evaluate as evaluate_lib
from mio_jax import models
from mio_jax import pairs as pairs_lib
from mio_jax import paths
from mio_jax import periodic
from mio_jax import reference as reference_lib
from mio_jax import online_config
from mio_jax import reference_pass
from mio_jax import rewards as rewards_lib
from mio_jax import rollouts as rollouts_lib
from mio_jax import run_eval, run_model, stages
from mio_jax import sharding as sharding_lib
from mio_jax import train_step as step_lib
from mio_jax import train as train_lib
from mio_jax import verifiers
from mio_jax.data import pipeline as data_lib
from mio_jax.data import plan as plan_lib
from mio_jax.data import sources as data_sources
from mio_jax.models import frozen
from mio_jax.online_config import PAIR_RULES, total_steps

# ---- pure pieces -------------------------------------------------------------------------

def round_examples(config, r: int, jsonl_rows: Sequence[dict] | None = None
                   ) -> list[tuple[dict, str]]:
    """Round ``r``'s prompts as ``(example, verifier name)``: M reasoning-gym items per task
    (item seeds ``prompt_seed + r*M ...``), then the JSONL's rows ``r*M ...`` (cycling)."""
    o = config.online
    m = o.prompts_per_round
    out = []
    task_config = heldout.parse_task_config(o.task_config)
    for task in [t.strip() for t in o.tasks.split(",") if t.strip()]:
        for ex in heldout.reasoning_gym_examples(task, m, o.prompt_seed + r * m,
                                                      task_config):
            out.append((ex, o.verifier or "reasoning_gym"))
    if jsonl_rows:
        n = len(jsonl_rows)
        out.extend((dict(jsonl_rows[(r * m + i) % n]), o.verifier or "exact_number")
                   for i in range(m))
    return out


def round_stats(samples: Sequence[dict]) -> dict[str, float]:
    """What a person watches about a round's samples: pass rate, the fraction of prompts
    with signal (some right, some wrong), all/none-correct counts, answer lengths."""
    scores = [[verifiers.is_correct(s["score"]) for s in p["samples"]] for p in samples]
    tokens = [s["tokens"] for p in samples for s in p["samples"]]
    n = max(len(scores), 1)
    good = [sum(s) for s in scores]
    return {
        "prompts": float(len(scores)),
        "pass_rate": float(sum(good)) / max(sum(len(s) for s in scores), 1),
        "signal_fraction": sum(0 < g < len(s) for g, s in zip(good, scores)) / n,
        "all_correct": float(sum(g == len(s) for g, s in zip(good, scores))),
        "none_correct": float(sum(g == 0 for g in good)),
        "answer_tokens_mean": float(np.mean(tokens)) if tokens else 0.0,
        "answer_tokens_max": float(max(tokens)) if tokens else 0.0,
        "truncated_fraction": (sum(s["finish"] == "length" for p in samples
                                   for s in p["samples"]) / max(len(tokens), 1)),
        "blank_answers": float(sum(not s["text"].strip() for p in samples
                                   for s in p["samples"])),
    }


def round_rows(samples: Sequence[dict], rule: str, num_negatives: int = 0) -> list[dict]:
    """The round's training rows from its scored samples (``rule``: ``PAIR_RULES``). Blank
    answers (an end-of-sequence token first) are scored and counted but never paired: a
    preference row needs a completion to train on."""
    mode, per_prompt = PAIR_RULES[rule]
    rows = []
    for p in samples:
        kept = [s for s in p["samples"] if s["text"].strip()]
        rows.extend(pairs_lib.rows_for_prompt(
            p["prompt"], p["example"], [s["text"] for s in kept], [s["score"] for s in kept],
            mode=mode, pairs_per_prompt=per_prompt, num_negatives=num_negatives))
    return rows


def logratio_metrics(policy: reference_lib.ReferenceTable,
                     ref: reference_lib.ReferenceTable | None) -> dict[str, float]:
    """Means over the round's rows of the chosen (column 0) and rejected log-probs under
    the policy and, with a reference, of the chosen log-ratio log pi - log pi_ref."""
    present = policy.present_n
    lp = policy.logps_nk[present]
    out = {"logps_chosen": float(np.mean(lp[:, 0])),
           "logps_rejected": float(np.mean(lp[:, 1:]))}
    if ref is not None:
        ratio = lp - ref.logps_nk[present]
        out["chosen_logratio"] = float(np.mean(ratio[:, 0]))
        out["rejected_logratio"] = float(np.mean(ratio[:, 1:]))
    return out


# ---- files ------------------------------------------------------------------------------

def round_dir(workdir: str, r: int) -> str:
    return paths.join(workdir, "online", f"round_{r:04d}")


def _exists(path: str) -> bool:
    return distributed.from_process_zero(jax.process_index() == 0 and paths.exists(path))


def _write_jsonl(path: str, rows: Sequence[dict]) -> None:
    if jax.process_index() == 0:
        pairs_lib.write_rows(rows, path)


def _read_jsonl(path: str) -> list[dict]:
    try:
        return [row for _, row in data_sources.iter_jsonl(path)]
    except ValueError as e:
        raise ValueError(f"{e}; this round's file is damaged: move the round folder aside "
                         "to redo the round") from e


# ---- the loop ---------------------------------------------------------------------------

@dataclasses.dataclass
class _RoundPosition:
    """What a checkpoint saves as its data position: the round and its pipeline's state."""

    round: int
    iterator: Any = None

    def get_state(self) -> dict:
        return {"round": self.round,
                "iterator": None if self.iterator is None else self.iterator.get_state()}


def sample_round(config, model, tokenizer, examples: Sequence[tuple[dict, str]], r: int,
                 check=None) -> list[dict]:
    """K scored answers per prompt from ``model`` (same on every process: the same weights,
    prompts and seeds). ``check()`` runs between generation calls (preemption)."""
    o = config.online
    k = online_config.samples_per_prompt(config)
    keep_ids = online_config.grpo_enabled(config)  # rollouts train on the sampled tokens
    prompts = [evaluate_lib.prompt_messages(ex, o.system) for ex, _ in examples]
    texts, tokens, finish, ids, prompt_ids = [], [], [], [], []
    if o.sampler == "groups":  # each prompt prefilled once for its K samples
        per_call, group = max(o.sample_batch_size // k, 1), k
        calls = [prompts[i:i + per_call] for i in range(0, len(prompts), per_call)]
        offsets = [i * k for i in range(0, len(prompts), per_call)]
    else:
        flat = [p for p in prompts for _ in range(k)]
        step, group = max(o.sample_batch_size, 1), 1
        calls = [flat[i:i + step] for i in range(0, len(flat), step)]
        offsets = list(range(0, len(flat), step))
    for start, batch in zip(offsets, calls):
        out = models.generate(model, tokenizer, batch,
                              max_new_tokens=o.max_new_tokens, temperature=o.temperature,
                              top_p=o.top_p, top_k=o.top_k,
                              seed=int(config.seed) * 1_000_003 + r * 7919 + start,
                              batch_size=len(batch) * group, num_samples=group)
        texts += out.texts
        tokens += [len(t) for t in out.token_ids]
        finish += out.finish_reasons
        ids += [list(map(int, t)) for t in out.token_ids]
        prompt_ids += [list(map(int, t)) for t in out.prompt_token_ids]
        if check is not None:
            check()
    result = []
    for i, ((ex, verifier), prompt) in enumerate(zip(examples, prompts)):
        verify = verifiers.get(verifier)
        own = range(i * k, (i + 1) * k)
        row = {"index": i, "example": ex, "verifier": verifier, "prompt": prompt,
               "samples": [{"text": texts[j], "score": float(verify(texts[j], ex)),
                            "tokens": tokens[j], "finish": finish[j]} for j in own]}
        if keep_ids:
            row["prompt_ids"] = prompt_ids[i * k]
            for j, sample in zip(own, row["samples"]):
                sample["ids"] = ids[j]
        result.append(row)
    return result


def score_rollouts(samples: Sequence[dict], funcs: Sequence[rewards_lib.Reward]
                   ) -> tuple[list[dict], dict[str, float]]:
    """The round's samples with each answer's rewards (``"rewards"``: one value per
    function, None where it did not apply; ``"reward"``: their weighted sum, None when no
    function scored it), and TRL's per-function reward metrics."""
    flat = [(p, s) for p in samples for s in p["samples"]]
    examples = [dict(p["example"], verifier=p["verifier"]) for p, _ in flat]
    table = rewards_lib.score(funcs, [p["prompt"] for p, _ in flat], [s["text"] for _, s in flat],
                              [s["ids"] for _, s in flat], examples)
    total = rewards_lib.combine(table, funcs)
    out, n = [], 0
    for p in samples:
        scored = []
        for s in p["samples"]:
            scored.append(dict(s, rewards={f.name: None if np.isnan(v) else float(v)
                                           for f, v in zip(funcs, table[n])},
                               reward=None if np.isnan(total[n]) else float(total[n])))
            n += 1
        out.append(dict(p, samples=scored))
    return out, rewards_lib.metrics(table, [f.name for f in funcs])


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
    """Runs an online experiment (``online.enabled``) in ``workdir``, resuming if it holds
    checkpoints: the trainer's stages (mesh, model, state, loop parts), then the rounds.
    No train pipeline: each round builds its own from the rows it sampled.

    Returns: as ``train.train_and_evaluate``, plus ``"rounds"`` (each round's done record).
    """
    workdir = paths.resolve(workdir)
    config = mio_config.resolve(config)
    mesh = train_lib.build_mesh(config, workdir)
    model = run_model.build_model(config, mesh)
    with jax.set_mesh(mesh):
        data = stages.Data(None, None, total_steps(config),
                           sharding_lib.batch_sharding(mesh), train_lib.row_multiple(mesh))
        training = train_lib.restore_or_init(config, workdir, model, data.total_steps, mesh)
        initial = None  # LoRA: the base with the adapters off; "previous": the state
        if model.config.lora is None and config.online.reference == "initial":
            initial = frozen.frozen_params(model.params, model.config.dtype)
        model = dataclasses.replace(model, params=None)
        run = stages.Run(config, workdir, mesh, model, data,
                         stages.Reference(step_lib.StepConsts(model.other)),
                         stages.step_config(config))
        return train_online(run, training, initial)


@dataclasses.dataclass
class _Round:
    """One round's files and what its phases hand each other."""

    r: int
    folder: str
    start: dict
    samples: list | None = None
    rows: list | None = None
    steps: int = 0
    split: Any = None
    ref_table: Any = None
    rollouts: Any = None
    old_logps: Any = None
    ref_logps: Any = None
    metrics: dict = dataclasses.field(default_factory=dict)

    def path(self, name: str) -> str:
        return paths.join(self.folder, name)


class _Driver:
    """The rounds of an online run as named phases, each tied to its files in
    ``<workdir>/online/round_<r>/`` and idempotent (a resumed round re-reads what its
    phases wrote and redoes only what is missing):

    - ``sample``: prompts.jsonl, then samples.jsonl (K scored answers per prompt from the
      policy at the round's start);
    - ``rows``: pairs.jsonl and start.json (the round's rows and its optimizer steps);
    - ``reference``: the reference log-probs of the rows (reference_cache/);
    - ``train``: the round's steps (resumed from the checkpoint's data position), then the
      rows under the trained policy (policy_cache/) and their log-ratio metrics;
    - ``close``: the checkpoint the next round samples from, the held-out eval, done.json
      and the round's metrics rows.

    A new kind of round (groups with advantages, say) is new ``rows`` and ``train`` phases
    and a loss, not a new driver. Decisions read from files are process 0's, broadcast.
    """

    def __init__(self, run, training, initial_params):
        self.run, self.training, self.initial_params = run, training, initial_params
        self.config, self.o = run.config, run.config.online
        self.state = training.state
        self.step = int(jax.device_get(self.state.step))
        self.position = _RoundPosition(0)
        self.loop = train_lib.make_loop(run, training, self.step, self.position)
        self.full_projection_cfg = run.step_cfg.full_projection()
        self.jsonl_rows = evaluate_lib.jsonl_examples(self.o.jsonl) if self.o.jsonl else None
        self.restored = training.data_state if isinstance(training.data_state, dict) else None
        self.logged = _logged_rounds(run.workdir)  # process 0's view; decisions are agreed
        self.eval_at_start = (self.config.eval.at_start and
                              not distributed.from_process_zero("eval_start" in self.logged))
        self.preemption = None
        self.grpo = online_config.grpo_enabled(self.config)

    def run_rounds(self) -> list[dict]:
        out = []
        with periodic.Preemption(self.loop.checkpoints) as self.preemption:
            for r in range(self.o.rounds):
                rd = round_dir(self.run.workdir, r)
                self.position.round, self.position.iterator = r, None
                done_path = paths.join(rd, "done.json")
                if _exists(done_path):  # a finished round: its record only
                    done = paths.read_json(done_path)
                    _log_round(self.loop, done, self.logged)
                    out.append(done)
                    continue
                if r == 0 and self.eval_at_start and self.step == 0:
                    self.loop.evals.run(0, self.state.params, "eval at start")
                rnd = self.begin(r, rd)
                self.sample(rnd)
                if self.grpo:
                    self.make_rollouts(rnd)
                    if rnd.steps:
                        self.rollout_tables(rnd)
                        self.train_rollouts(rnd)
                else:
                    self.make_rows(rnd)
                    if rnd.steps:
                        self.reference(rnd)
                        self.train(rnd)
                out.append(self.close(rnd))
            self.loop.finish(self.step, self.state)
        return out

    def begin(self, r: int, rd: str) -> _Round:
        start_path = paths.join(rd, "start.json")
        start = (paths.read_json(start_path) if _exists(start_path)
                 else {"round": r, "start_step": self.step})
        if self.step < start["start_step"]:
            raise RuntimeError(
                f"{start_path}: round {r} started at step {start['start_step']} but the "
                f"newest checkpoint is step {self.step}; the checkpoints of this run are "
                "missing: restore them, or start again in a new --workdir")
        return _Round(r, rd, start)

    def sample(self, rnd: _Round) -> None:
        """prompts.jsonl and samples.jsonl: the policy as it is at the round's start."""
        samples_path = rnd.path("samples.jsonl")
        if _exists(samples_path):
            rnd.samples = _read_jsonl(samples_path)
            return
        if self.step != rnd.start["start_step"]:
            raise RuntimeError(f"{rnd.folder}: samples.jsonl is missing but training of "
                               f"round {rnd.r} has passed step {rnd.start['start_step']}")
        examples = round_examples(self.config, rnd.r, self.jsonl_rows)
        _write_jsonl(rnd.path("prompts.jsonl"), [ex for ex, _ in examples])
        model = nnx.merge(self.run.model.graphdef, self.state.params, self.run.model.other)
        rnd.samples = sample_round(self.config, model, self.run.model.tokenizer, examples,
                                   rnd.r, check=lambda: self.preemption.check(self.step,
                                                                              self.state))
        del model
        _write_jsonl(samples_path, rnd.samples)

    def make_rows(self, rnd: _Round) -> None:
        """pairs.jsonl and start.json: the round's rows and its number of steps."""
        rnd.metrics = round_stats(rnd.samples)
        rnd.rows = round_rows(rnd.samples, self.o.pairs, self.o.num_negatives)
        rnd.steps = _train_steps(self.config, len(rnd.rows))
        rnd.start.update(rows=len(rnd.rows), steps=rnd.steps)
        start_path = rnd.path("start.json")
        if not _exists(start_path):
            _write_jsonl(rnd.path("pairs.jsonl"), rnd.rows)
            if jax.process_index() == 0:
                paths.write_json(start_path, rnd.start, indent=1)
        logging.info("round %d: %s; %d rows, %d steps", rnd.r, _fmt(rnd.metrics),
                     len(rnd.rows), rnd.steps)
        rnd.split = data_lib.prepare(self.config.data, self.run.model.tokenizer,
                                     split="train", source=rnd.rows) if rnd.steps else None

    # ---- GRPO rounds: rollouts -> per-token tables -> policy-gradient steps -------------

    def make_rollouts(self, rnd: _Round) -> None:
        """rollouts.jsonl and start.json: every answer's rewards, the round's groups with
        their advantages, and its number of steps."""
        g = self.config.grpo
        path = rnd.path("rollouts.jsonl")
        if _exists(path):
            scored, reward_metrics = _read_jsonl(path), None
        else:
            scored, reward_metrics = score_rollouts(rnd.samples,
                                                    online_config.parse_rewards(self.config))
        ro, metrics = rollouts_lib.build(
            scored, scale_rewards=g.scale_rewards,
            mask_truncated_completions=bool(g.mask_truncated_completions),
            drop_zero_std_groups=bool(g.drop_zero_std_groups),
            min_length=rollouts_lib.LENGTH_MULTIPLE, advantage=g.advantage,
            shared_prompt=bool(self.config.data.shared_prompt))
        if reward_metrics is None:  # a resumed round: the metrics from the stored rewards
            reward_metrics = _reward_metrics_of(scored)
        rnd.rollouts, rnd.rows = ro, ro.groups
        rnd.metrics = {**round_stats(rnd.samples), **metrics, **reward_metrics}
        per = rollouts_lib.steps_per_iteration(len(ro.groups), self.config.train.batch_size)
        rnd.steps = int(g.num_iterations) * per
        rnd.start.update(rows=len(ro.groups), steps=rnd.steps)
        start_path = rnd.path("start.json")
        if not _exists(start_path):
            _write_jsonl(path, scored)
            if jax.process_index() == 0:
                paths.write_json(start_path, rnd.start, indent=1)
        logging.info("round %d: %s; %d groups, %d steps", rnd.r, _fmt(rnd.metrics),
                     len(ro.groups), rnd.steps)

    def rollout_tables(self, rnd: _Round) -> None:
        """old_logps.npy (the round-start policy's per-token log-probs, when the round
        takes more than one step) and ref_logps.npy (the reference's, when grpo.beta > 0),
        computed once before the round's first step."""
        at_start = self.step == rnd.start["start_step"]
        previous = self.o.reference == "previous"
        ref_params = self.state.params if self.initial_params is None else self.initial_params
        needs = {"old": (rnd.steps > 1, self.state.params, "policy"),
                 "ref": (self.config.grpo.beta != 0,
                         ref_params, "policy" if previous else "base")}
        for name, (needed, params, view) in needs.items():
            if not needed:
                continue
            path = rnd.path(f"{name}_logps.npy")
            stored = _exists(path)  # process 0's answer, for every process
            if stored:
                # stored by this round, perhaps in the other layout (a switched resume)
                try:
                    table = rollouts_lib.fit_width(np.load(paths.local_copy(path)),
                                                   rnd.rollouts.length)
                except ValueError as e:
                    raise RuntimeError(f"{path}: {e}") from e
            elif name == "ref" and previous and rnd.old_logps is not None:
                table = rnd.old_logps  # the round-start policy is both
            else:
                if name == "old" and not at_start:
                    raise RuntimeError(f"{rnd.folder}: old_logps.npy is missing but training "
                                       f"of round {rnd.r} has passed step "
                                       f"{rnd.start['start_step']}")
                table = reference_pass.rollout_token_table(
                    self.run, rnd.rollouts, params=params, view=view,
                    batch_size=self.config.train.batch_size)
            if not stored and jax.process_index() == 0:
                buf = io.BytesIO()
                np.save(buf, table)
                paths.write_bytes(path, buf.getvalue())
            setattr(rnd, f"{name}_logps", table)

    def train_rollouts(self, rnd: _Round) -> None:
        """The round's policy-gradient steps; which groups a step reads follows from the
        step alone, so a resumed round continues where its checkpoint was taken."""
        it = _RolloutBatches(self.config, rnd)
        it.j = self.step - rnd.start["start_step"]
        self.position.iterator = it
        stop = rnd.start["start_step"] + rnd.steps
        self.state, self.step = train_lib.run_steps(self.run, self.loop, self.preemption,
                                                    self.state, self.step, stop, it, None)
        self.loop.flush()

    def _table(self, rnd: _Round, name: str, params, view: str, fingerprint: str):
        return reference_pass.precompute_table(
            self.config, self.run.model, self.run.data.sharding, self.run.mesh,
            self.full_projection_cfg, rnd.split, name, params=params, view=view,
            cache_dir=rnd.path(f"{name}_cache"), weights_fp=fingerprint)

    def reference(self, rnd: _Round) -> None:
        """reference_cache/: the rows' log-probs under the initial model (LoRA: this
        state's adapters, off) or under the policy at the round's start."""
        if self.config.reference.mode != "precomputed":
            return
        # "previous": the policy as the round starts; "initial": the initial model's base,
        # a LoRA state's own weights with the adapters off or the frozen initial weights
        previous = self.o.reference == "previous"
        params = self.state.params if self.initial_params is None else self.initial_params
        rnd.ref_table = self._table(rnd, "reference", params, "policy" if previous else "base",
                                    f"online round {rnd.r} reference {self.o.reference}")

    def train(self, rnd: _Round) -> None:
        """The round's steps, then its rows under the trained policy (policy_cache/)."""
        it = _round_pipeline(self.config, self.run, rnd.split, rnd.r)
        if (self.restored and self.restored.get("round") == rnd.r
                and self.step > rnd.start["start_step"]):
            it.set_state(self.restored["iterator"])
        self.position.iterator = it
        stop = rnd.start["start_step"] + rnd.steps
        self.state, self.step = train_lib.run_steps(self.run, self.loop, self.preemption,
                                                    self.state, self.step, stop, it,
                                                    rnd.ref_table)
        self.loop.flush()
        policy = self._table(rnd, "policy", self.state.params, "policy",
                             f"online round {rnd.r} policy after step {self.step}")
        rnd.metrics.update(logratio_metrics(policy, rnd.ref_table))

    def close(self, rnd: _Round) -> dict:
        """The checkpoint the next round samples from, the held-out eval, done.json and the
        round's metrics rows."""
        self.loop.save_now(self.step, self.state)
        every = self.o.eval_every_rounds
        due = every and ((rnd.r + 1) % every == 0 or rnd.r + 1 == self.o.rounds)
        held_out = run_eval.held_out_metrics(self.run, self.state.params, self.step) if due else {}
        done = {"round": rnd.r, "start_step": rnd.start["start_step"], "end_step": self.step,
                "rows": len(rnd.rows), "steps": rnd.steps, **rnd.metrics,
                "train": self.loop.last_train_metrics() if rnd.steps else {},
                "eval": held_out}
        if jax.process_index() == 0:
            paths.write_json(rnd.path("done.json"), done, indent=1)
        _log_round(self.loop, done, self.logged)
        return done


class _RolloutBatches:
    """A GRPO round's batches as the train loop reads them: step ``j`` of the round is the
    global batch ``rollouts.batch_ids(..., j)``, this process's share of it with its
    advantages and tables, and its ``BatchInfo``."""

    def __init__(self, config, rnd: _Round):
        self.config, self.rnd, self.j = config, rnd, 0
        # FLOPs are credited as unshared work, whatever the layout (plan_lib.BatchInfo)
        self.seq_len = rollouts_lib.padded_length(rnd.rollouts.groups,
                                                  rollouts_lib.LENGTH_MULTIPLE)

    def next_with_info(self):
        ro, bs = self.rnd.rollouts, int(self.config.train.batch_size)
        ids = rollouts_lib.batch_ids(len(ro.groups), bs, int(self.config.seed), self.rnd.r,
                                     self.j)
        self.j += 1
        host = rollouts_lib.local_batch(
            ro, ids, pad_id=self.config.data.pad_id, process_index=jax.process_index(),
            process_count=jax.process_count(), old_logps=self.rnd.old_logps,
            ref_logps=self.rnd.ref_logps)
        seq = [sum(ro.groups[i].seq_lengths) if i >= 0 else 0 for i in ids]
        completion = [sum(int(c) * len(x) for c, x in zip(ro.counted[i], ro.groups[i].completion_ids))
                      if i >= 0 else 0 for i in ids]
        info = plan_lib.BatchInfo(tokens=int(sum(seq)), seq_len=self.seq_len,
                                  completion_tokens=np.asarray(completion),
                                  mask_shape=(bs, *np.shape(host.loss_mask)[1:]))
        return host, info

    def get_state(self) -> dict:
        return {"rollout_step": self.j}


def _reward_metrics_of(scored: Sequence[dict]) -> dict[str, float]:
    """TRL's per-function reward metrics from stored rewards (a resumed round)."""
    names = list(scored[0]["samples"][0]["rewards"]) if scored and scored[0]["samples"] else []
    table = np.asarray([[np.nan if s["rewards"][n] is None else s["rewards"][n] for n in names]
                        for p in scored for s in p["samples"]], np.float64)
    return rewards_lib.metrics(table.reshape(-1, len(names)), names)


def train_online(run, training, initial_params) -> dict[str, Any]:
    """The rounds (``run.data.total_steps`` = rounds x steps_per_round bounds the schedule).

    Args:
      run: the ``stages.Run`` (its data has no train pipeline: each round builds its own).
      training: the restored or fresh ``stages.Training``.
      initial_params: the starting weights (the "initial" reference of a full-weight run).
    """
    driver = _Driver(run, training, initial_params)
    try:
        rounds = driver.run_rounds()
        exported = (run_model.export(run, driver.state.params)
                    if run.config.checkpoint.export_hf else None)
    finally:
        driver.loop.close(training)
    last_eval = next((d["eval"] for d in reversed(rounds) if d.get("eval")), {})
    return {"step": driver.step, "train": driver.loop.last_train_metrics(), "eval": last_eval,
            "export": exported, "state": driver.state, "rounds": rounds}


def _train_steps(config, n_rows: int) -> int:
    """The round's optimizer steps: ``steps_per_round``, or 0 when the round has fewer
    rows than one batch."""
    if n_rows < config.train.batch_size:
        logging.warning("online round: %d rows, fewer than train.batch_size=%d: no training "
                        "this round", n_rows, config.train.batch_size)
        return 0
    return int(config.online.steps_per_round)


def _round_pipeline(config, run, split, r: int):
    dcfg = config.data.copy_and_resolve_references()
    with dcfg.unlocked():
        dcfg.num_epochs = 0  # repeat the round's rows as long as its steps need
    return data_lib.make_pipeline(dcfg, run.model.tokenizer, split="train",
                                  batch_size=config.train.batch_size,
                                  seed=int(config.seed) * 1_000_003 + r, prepared=split,
                                  row_multiple=run.data.row_multiple,
                                  micro_batches=config.train.grad_accum_steps)


def _fmt(stats: dict) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in stats.items())


def _scalars(done: dict) -> dict[str, float]:
    return {k: float(v) for k, v in done.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _logged_rounds(workdir: str) -> set:
    """Rounds (and "eval_start") whose rows ``metrics.jsonl`` already holds (process 0)."""
    path = paths.join(workdir, "metrics.jsonl")
    seen: set = set()
    if jax.process_index() != 0 or not paths.exists(path):
        return seen
    for line in paths.read_text(path).splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("split") == "round":
            seen.add(int(row["round"]))
        elif row.get("split") == "eval" and row.get("step") == 0:
            seen.add("eval_start")
    return seen


def _log_round(loop, done: dict, logged: set) -> None:
    """The round's rows in metrics.jsonl (split "round", and its held-out "eval"), once."""
    if done["round"] in logged:
        return
    if done.get("eval"):
        loop.write_row(done["end_step"], done["eval"], "eval")
    loop.write_row(done["end_step"], _scalars(done), "round")
    logged.add(done["round"])
    logging.info("round %d done at step %d: %s", done["round"], done["end_step"],
                 _fmt({k: v for k, v in _scalars(done).items()
                       if k not in ("round", "start_step", "end_step")}))
    if done.get("eval"):
        logging.info("round %d held-out eval: %s", done["round"], _fmt(_scalars(done["eval"])))


