"""The pretraining run of `training.lm` on the resumable loop of `training.loop`: params and
optimizer state checkpointed, weights optionally from another run, periodic validation (loss on
held-out books, greedy retrieval accuracy on held-out prose)."""

from __future__ import annotations

import dataclasses
import pathlib

import jax
from flax import nnx

from kvjax import retrieval
from kvjax.errors import KVJaxError
from kvjax.models.llama import CausalLM
from training import lm, loop


def new_model(cfg: lm.LMConfig, tokenizer):
    from kvjax.config import ModelConfig

    model_cfg = ModelConfig.from_hf_config(cfg.hf_config(tokenizer))
    return CausalLM(model_cfg, rngs=nnx.Rngs(cfg.seed))


def _initial_params(ocp, source: pathlib.Path, template):
    """The weights of another run's latest checkpoint, or of an exported HF model (same model shape)."""
    if (source / "config.json").is_file():
        import kvjax

        model, _, _ = kvjax.load(source, "float32", tokenizer=False)
        params = nnx.state(model, nnx.Param)
        if jax.tree.structure(params) != jax.tree.structure(template["params"]) or any(
                a.shape != b.shape for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(template["params"]))):
            raise KVJaxError(f"--init-from {source}: that model's shape differs from this run's flags")
        return params
    work = source
    with ocp.CheckpointManager((work / "checkpoints").absolute()) as other:
        step = other.latest_step()
        if step is None:
            raise KVJaxError(f"--init-from {work}: no checkpoint there; pass the work dir of a finished run")
        return other.restore(step, args=ocp.args.StandardRestore(template))["params"]


DIGIT_RECORDS = (1, 4, 8)  # records per task of the teacher-forced digit accuracy


def validate(graphdef, params, tokenizer, texts, cfg: lm.LMConfig, num_tasks: int = 16) -> dict:
    """Loss on the validation books (fixed windows), greedy exact-match on retrieval tasks, and the
    teacher-forced accuracy of the asked code's digits with 1, 4 and 8 records in ~40 words of prose
    (`digit_acc_r<N>`: it moves long before exact-match does, so a run's progress on binding shows)."""
    loss, _ = lm.eval_loss(params, graphdef, lm.prose_batch(tokenizer, texts["validation"], cfg))
    model = nnx.merge(graphdef, params)
    sentences, correct = retrieval.sentences(texts["validation"]), 0
    for i in range(num_tasks):
        task = retrieval.key_value_recall(sentences, 10_000 + i, num_words=cfg.seq_len // 3)
        correct += task.is_answered_by(lm.greedy_answer(model, tokenizer, task)[0])
    out = {"val_loss": float(loss), "recall_acc": correct / num_tasks}
    for records in DIGIT_RECORDS:
        tasks = [retrieval.key_value_recall(sentences, 20_000 + i, num_records=records, num_words=40)
                 for i in range(2 * num_tasks)]
        out[f"digit_acc_r{records}"] = float(lm.digit_accuracy(params, graphdef, lm.code_digit_rows(tokenizer, tasks)))
    return out


def train(work: pathlib.Path, texts, tokenizer, cfg: lm.LMConfig, *, save_every: int, eval_every: int,
          stop_after: int | None = None, quiet: bool = False):
    """Train to cfg.steps (resuming from WORK/checkpoints); the model, or None when stop_after ended
    the run first."""
    import orbax.checkpoint as ocp

    graphdef, params = nnx.split(new_model(cfg, tokenizer))
    tx = lm.optimizer(cfg)
    batches = lm.Batches(tokenizer, texts["train"], cfg)

    def step_fn(state, step):
        params, opt_state, out = lm.train_step(state["params"], graphdef, state["opt_state"], batches(step), tx)
        return {"params": params, "opt_state": opt_state}, out

    def init(state):
        source = pathlib.Path(cfg.init_from).expanduser()
        return {"params": _initial_params(ocp, source, state), "opt_state": state["opt_state"]}

    state = loop.run_steps(work, dataclasses.asdict(cfg), {"params": params, "opt_state": tx.init(params)}, step_fn,
                           steps=cfg.steps, save_every=save_every, eval_every=eval_every,
                           validate=lambda s: validate(graphdef, s["params"], tokenizer, texts, cfg),
                           init=init if cfg.init_from else None, stop_after=stop_after, quiet=quiet)
    return None if state is None else nnx.merge(graphdef, state["params"])


def latest_model(work: pathlib.Path, cfg: lm.LMConfig, tokenizer):
    """(the model at WORK's latest checkpoint, its step): to export a run stopped early."""
    graphdef, params = nnx.split(new_model(cfg, tokenizer))
    state, step = loop.latest_state(work, {"params": params, "opt_state": lm.optimizer(cfg).init(params)})
    return nnx.merge(graphdef, state["params"]), step
