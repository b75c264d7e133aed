"""The resumable pretraining loop of `training.lm`: orbax checkpoints (params, optimizer state,
step) every save_every steps, resumed bitwise from the latest; metrics.jsonl; a tqdm bar; periodic
validation (loss on held-out books, greedy retrieval accuracy on held-out prose)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
from flax import nnx

from kvjax import retrieval
from kvjax.errors import KVJaxError
from kvjax.models.llama import CausalLM
from training import lm


def new_model(cfg: lm.LMConfig, tokenizer):
    from kvjax.config import ModelConfig

    model_cfg = ModelConfig.from_hf_config(cfg.hf_config(tokenizer))
    return CausalLM(model_cfg, rngs=nnx.Rngs(cfg.seed))


def _check_run(work: pathlib.Path, cfg: lm.LMConfig) -> None:
    path = work / "run.json"
    saved = json.loads(path.read_text()) if path.is_file() else None
    if saved is not None and saved != dataclasses.asdict(cfg):
        changed = sorted(k for k in saved if saved[k] != dataclasses.asdict(cfg).get(k))
        raise KVJaxError(f"{work} holds a run with other settings ({', '.join(changed)}); resume with the same "
                         "flags or choose another --work-dir")
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


def _metrics(work: pathlib.Path, start: int):
    """metrics.jsonl with the lines past `start` dropped (a resumed run writes them again)."""
    path = work / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    path.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= start))
    return path.open("a")


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


def validate(graphdef, params, tokenizer, texts, cfg: lm.LMConfig, num_tasks: int = 16) -> dict:
    """Loss on the validation books (fixed windows) and greedy exact-match on retrieval tasks."""
    loss, _ = lm.eval_loss(params, graphdef, lm.prose_batch(tokenizer, texts["validation"], cfg))
    model = nnx.merge(graphdef, params)
    sentences, correct = retrieval.sentences(texts["validation"]), 0
    for i in range(num_tasks):
        task = retrieval.key_value_recall(sentences, 10_000 + i, num_words=cfg.seq_len // 3)
        correct += task.is_answered_by(lm.greedy_answer(model, tokenizer, task)[0])
    return {"val_loss": float(loss), "recall_acc": correct / num_tasks}


def train(work: pathlib.Path, texts, tokenizer, cfg: lm.LMConfig, *, save_every: int, eval_every: int,
          stop_after: int | None = None, quiet: bool = False):
    """Train to cfg.steps (resuming from WORK/checkpoints); the model, or None when stop_after ended
    the run first."""
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    _check_run(work, cfg)
    graphdef, params = nnx.split(new_model(cfg, tokenizer))
    tx = lm.optimizer(cfg)
    state = {"params": params, "opt_state": tx.init(params)}
    options = ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=save_every)
    with ocp.CheckpointManager((work / "checkpoints").absolute(), options=options) as manager:
        start = manager.latest_step() or 0
        if start:
            state = manager.restore(start, args=ocp.args.StandardRestore(state))
        elif cfg.init_from:
            state = {"params": _initial_params(ocp, pathlib.Path(cfg.init_from).expanduser(), state), "opt_state":
                     state["opt_state"]}
        batches = lm.Batches(tokenizer, texts["train"], cfg)
        end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
        with _metrics(work, start) as metrics:
            bar = tqdm(range(start, end), initial=start, total=cfg.steps, disable=quiet, desc="train")
            for step in bar:
                tic = time.perf_counter()
                params, opt_state, out = lm.train_step(state["params"], graphdef, state["opt_state"], batches(step),
                                                       tx)
                state = {"params": params, "opt_state": opt_state}
                row = {"step": step + 1, **{k: float(v) for k, v in jax.device_get(out).items()},
                       "seconds": time.perf_counter() - tic}
                if (step + 1) % eval_every == 0 or step + 1 == cfg.steps:
                    row.update(validate(graphdef, state["params"], tokenizer, texts, cfg))
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{row['loss']:.3f}")
                manager.save(step + 1, args=ocp.args.StandardSave(state), force=step + 1 == end)
        manager.wait_until_finished()
    return nnx.merge(graphdef, state["params"]) if end == cfg.steps else None


def latest_model(work: pathlib.Path, cfg: lm.LMConfig, tokenizer):
    """(the model at WORK's latest checkpoint, its step): to export a run stopped early."""
    import orbax.checkpoint as ocp

    graphdef, params = nnx.split(new_model(cfg, tokenizer))
    state = {"params": params, "opt_state": lm.optimizer(cfg).init(params)}
    with ocp.CheckpointManager((work / "checkpoints").absolute()) as manager:
        step = manager.latest_step()
        if step is None:
            raise KVJaxError(f"{work} has no checkpoint to export; train first")
        state = manager.restore(step, args=ocp.args.StandardRestore(state))
    return nnx.merge(graphdef, state["params"]), step
