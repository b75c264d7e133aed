"""The training loop: data -> jitted distillation steps -> validation, plateau LR, checkpoints.

Layout of --out: checkpoints/<step>/ (orbax; the latest is what --resume reads), best/ and
compressor/ (compressor checkpoints that `python -m kvjax.chat --kv-compress-ckpt` reads: best
by validation loss, and final), metrics.jsonl (one line per step and per validation),
summary.json (final figures, throughput).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kvjax.compression.checkpoint import distilled_for, load_compressor, save_compressor
from kvjax.compression.ccm import CompressorConfig, build_compressor
from kvjax.errors import KVJaxError
from training import checkpoints, data
from training.config import TrainConfig
from training.losses import LossConfig
from training.objective import StepConfig, eval_step, train_step
from training.vision import image_contexts


def loss_config(cfg: TrainConfig) -> LossConfig:
    return LossConfig.preset(cfg.loss, kl_weight=cfg.kl_weight, ce_weight=cfg.ce_weight, js_weight=cfg.js_weight,
                             l1_weight=cfg.l1_weight, hidden_weight=cfg.hidden_weight, temperature=cfg.temperature,
                             top_p=cfg.top_p)


def build_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    return _optimizer(cfg.clip_norm, cfg.accumulate)


@functools.lru_cache(maxsize=8)  # the optimizer is a static jit argument: same settings, same compiled step
def _optimizer(clip_norm: float, accumulate: int) -> optax.GradientTransformation:
    """Adam (unit lr) after global-norm clipping; MultiSteps averages `accumulate` micro-batches per
    update. Adam's step is linear in its lr, so train_step multiplies the updates by lr x the plateau
    factor: the lr is an array, and runs with different lrs share one compiled step."""
    parts = ([optax.clip_by_global_norm(clip_norm)] if clip_norm else []) + [optax.adam(1.0)]
    optimizer = optax.chain(*parts)
    return optax.MultiSteps(optimizer, every_k_schedule=accumulate) if accumulate > 1 else optimizer


def build_plateau(cfg: TrainConfig):
    """Tracks validation loss; its `scale` multiplies every update (= scales Adam's lr)."""
    return optax.contrib.reduce_on_plateau(factor=cfg.plateau_factor, patience=cfg.plateau_patience)


def load_backbone(cfg: TrainConfig):
    """-> (model, tokenizer, model config, model dir); VLMs come whole (the vision tower embeds contexts)."""
    import kvjax  # noqa: PLC0415 (kvjax.load pulls in the loaders)

    if cfg.model_dir:
        model_dir = cfg.model_dir
    elif cfg.demo:
        from kvjax.testing.vlm import ensure_demo_vlm  # noqa: PLC0415

        model_dir = ensure_demo_vlm(cfg.demo)
    else:
        from kvjax.testing.text import ensure_demo_checkpoint  # noqa: PLC0415

        model_dir = ensure_demo_checkpoint()
    model, tokenizer, model_cfg = kvjax.load(model_dir, dtype=cfg.dtype)
    if tokenizer is None:
        raise KVJaxError(f"{model_dir} has no tokenizer; training needs one to encode the data")
    return model, tokenizer, model_cfg, model_dir


def make_compressor(cfg: TrainConfig, model_cfg, has_images: bool):
    kind = cfg.compressor or ("decouple" if has_images else "hybrid")
    if cfg.init_compressor:
        compressor = load_compressor(cfg.init_compressor, model_cfg, dtype=cfg.dtype, dropout=cfg.dropout,
                                     min_seq_len=cfg.min_seq_len, keep_last=cfg.keep_last, rope_positions=cfg.positions)
        if compressor.cfg.compression_factor != cfg.compression_factor:
            raise KVJaxError(f"--init-compressor {cfg.init_compressor} merges {compressor.cfg.compression_factor} "
                             f"tokens but --compression-factor is {cfg.compression_factor}")
        return compressor
    return build_compressor(CompressorConfig(
        num_layers=model_cfg.num_layers, num_kv_heads=model_cfg.num_kv_heads, head_dim=model_cfg.head_dim,
        compression_factor=cfg.compression_factor, min_seq_len=cfg.min_seq_len, keep_last=cfg.keep_last,
        dropout=cfg.dropout, image_mode="image_mlp" if kind == "decouple" else "text_mlp", rope_positions=cfg.positions,
        dtype=cfg.dtype), rngs=nnx.Rngs(cfg.seed))


def read_data(cfg: TrainConfig) -> list:
    from training.demo_data import ensure_demo_dataset, ensure_demo_image_dataset  # noqa: PLC0415

    if cfg.data:
        return data.read_records(cfg.data, cfg.image_root)[:cfg.max_examples]
    if cfg.demo:
        path = ensure_demo_image_dataset()
        return data.read_records(path, cfg.image_root or path.parent)[:cfg.max_examples]
    return data.read_records(ensure_demo_dataset())[:cfg.max_examples]


def load_examples(cfg: TrainConfig, records, tokenizer, compression_factor: int, contexts=None):
    examples = data.tokenize(records, tokenizer, max_context_len=cfg.max_context_len,
                             max_answer_len=cfg.max_answer_len,
                             min_context_len=compression_factor * max(cfg.min_seq_len, 1), contexts=contexts)
    train, val = data.split_train_val(examples, cfg.val_ratio, cfg.seed)
    if len(train) < cfg.batch_size:
        raise KVJaxError(f"{len(train)} training examples are fewer than --batch-size {cfg.batch_size}; "
                         "lower --batch-size or add data")
    return train, val


class Trainer:
    """Holds the split backbone and compressor; `run()` trains per the config."""

    def __init__(self, cfg: TrainConfig, *, log=print):
        self.cfg, self.log = cfg, log
        self.out = checkpoints.prepare_out_dir(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)
        self.loss_cfg = loss_config(cfg)
        model, self.tokenizer, model_cfg, model_dir = load_backbone(cfg)
        self.distilled_for = distilled_for(model_dir)  # recorded in every saved compressor
        records = read_data(cfg)
        has_images = any(r.image is not None for r in records)
        self.contexts = image_contexts(model, self.tokenizer, model_cfg, model_dir, has_images)
        self.model_cfg = getattr(model_cfg, "text", model_cfg)  # the language model's
        compressor = make_compressor(cfg, self.model_cfg, has_images)
        self.train_set, self.val_set = load_examples(cfg, records, self.tokenizer,
                                                     compressor.cfg.compression_factor, self.contexts)
        self.pad_id = self.tokenizer.pad_token_id or 0
        # the teacher/student steps run only the LM; a VLM's vision tower runs in `batch`, outside the gradient
        self.backbone_graphdef, self.backbone_state = nnx.split(getattr(model, "language_model", model))
        self.compressor_graphdef, params, self.rest = nnx.split(compressor, nnx.Param, ...)
        self.optimizer, self.plateau = build_optimizer(cfg), build_plateau(cfg)
        self.state = {"params": params, "opt_state": self.optimizer.init(params),
                      "plateau": self.plateau.init(params), "seed_key": jax.random.PRNGKey(cfg.seed)}
        self.step_cfg = StepConfig(loss=self.loss_cfg, rope_positions=cfg.positions)
        self.statics = dict(compressor_graphdef=self.compressor_graphdef, backbone_graphdef=self.backbone_graphdef,
                            cfg=self.step_cfg)

    def compressor(self, params=None):
        """The compressor with `params` (default: the current ones), in inference mode."""
        compressor = nnx.merge(self.compressor_graphdef, self.state["params"] if params is None else params, self.rest)
        compressor.eval()
        return compressor

    def evaluate(self, params=None) -> dict:
        """Position-weighted means over the validation split (no dropout)."""
        totals, count = {}, 0.0
        for examples in data.eval_chunks(self.val_set, self.cfg.batch_size):
            batch = self.batch(examples)
            metrics = jax.device_get(eval_step(self.state["params"] if params is None else params, self.rest, self.backbone_state,
                                               batch, **self.statics))
            num = float(metrics.pop("num_positions"))
            count += num
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v) * num
        return {k: v / max(count, 1.0) for k, v in totals.items()}

    def batch(self, examples) -> data.Batch:
        """Collate `examples`; VLM contexts get their embeddings (image features merged) here."""
        batch = data.collate(examples, self.cfg.batch_size, self.pad_id, min_bucket=self.cfg.min_bucket)
        if self.contexts is None:
            return batch
        return dataclasses.replace(batch, context_embeds=self.contexts.embed(batch.context, examples))

    def _train_step(self, batch, step):
        s = self.state
        params, opt_state, metrics = train_step(
            s["params"], s["opt_state"], s["plateau"].scale * jnp.float32(self.cfg.lr), jnp.int32(step), s["seed_key"], self.rest,
            self.backbone_state, batch, optimizer=self.optimizer, **self.statics)
        self.state = dict(s, params=params, opt_state=opt_state)
        return metrics

    def _validate(self, step, epoch, record, metrics_file) -> dict:
        val = self.evaluate()
        _, plateau = self.plateau.update(updates=self.state["params"], state=self.state["plateau"],
                                         value=jnp.float32(val["loss"]))
        self.state = dict(self.state, plateau=plateau)
        val["lr_scale"] = float(plateau.scale)
        metrics_file.write(json.dumps({"split": "val", "step": step, "epoch": epoch, **val}) + "\n")
        metrics_file.flush()
        if val["loss"] < record["best_val_loss"]:
            record["best_val_loss"] = val["loss"]
            save_compressor(self.out / "best", self.compressor(), overwrite=True,
                            extra={"step": step, "val": val, **self.distilled_for})
        return val

    def run(self) -> dict:
        from tqdm import tqdm  # noqa: PLC0415

        cfg = self.cfg
        if cfg.overwrite:
            checkpoints.clear_out_dir(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        record = {"step": 0, "epoch": 0, "next_batch": 0, "best_val_loss": float("inf"),
                  "initial_val": None, "config": dataclasses.asdict(cfg)}
        if cfg.resume:
            self.state, saved = checkpoints.restore(self.out, self.state)
            record.update({k: saved[k] for k in ("step", "epoch", "next_batch", "best_val_loss", "initial_val")})
            checkpoints.trim_metrics(self.out / "metrics.jsonl", record["step"])
        else:
            record["initial_val"] = self.evaluate()
        steps_per_epoch = len(data.epoch_order(len(self.train_set), cfg.batch_size, 0, cfg.seed))
        total = steps_per_epoch * cfg.epochs
        step, timed, seen_shapes, last_val = record["step"], [], set(), None
        bar = tqdm(total=total, initial=step, disable=cfg.quiet, desc="train", unit="step")
        with open(self.out / "metrics.jsonl", "a") as metrics_file:
            while record["epoch"] < cfg.epochs:
                epoch = record["epoch"]
                order = data.epoch_order(len(self.train_set), cfg.batch_size, epoch, cfg.seed)
                for index in range(record["next_batch"], len(order)):
                    examples = [self.train_set[i] for i in order[index]]
                    batch = self.batch(examples)
                    start = time.perf_counter()
                    metrics = {k: float(v) for k, v in jax.device_get(self._train_step(batch, step)).items()}
                    tokens = int(batch.context_len.sum() + batch.cont_len.sum())
                    shape = (batch.context.shape, batch.cont.shape)  # a new shape's step includes its compile
                    timed.append((time.perf_counter() - start, len(examples), tokens, shape in seen_shapes))
                    seen_shapes.add(shape)
                    step += 1
                    metrics_file.write(json.dumps({"split": "train", "step": step, "epoch": epoch, **metrics}) + "\n")
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4g}", kl=f"{metrics['kl']:.4g}",
                                    agree=f"{metrics['agreement']:.2f}")
                    is_last = index + 1 == len(order)
                    record.update(step=step, epoch=epoch + is_last, next_batch=0 if is_last else index + 1)
                    if is_last:
                        last_val = self._validate(step, epoch, record, metrics_file)
                    if step % cfg.save_every == 0 or step == cfg.stop_after or step == total:
                        metrics_file.flush()
                        checkpoints.save(self.out, step, self.state, record)
                    if step == cfg.stop_after:
                        bar.close()
                        return {"stopped_at": step}
                record.update(epoch=epoch + 1, next_batch=0)
        bar.close()
        return self._finish(record, last_val or self.evaluate(), timed)

    def _finish(self, record, final_val, timed) -> dict:
        save_compressor(self.out / "compressor", self.compressor(), overwrite=True,
                        extra={"step": record["step"], "val": final_val, **self.distilled_for})
        steady = [t for t in timed if t[3]]  # steps whose shape was already compiled
        seconds = sum(t[0] for t in steady)
        summary = {"steps": record["step"], "initial_val": record["initial_val"], "final_val": final_val,
                   "best_val_loss": record["best_val_loss"],
                   "examples_per_s": sum(t[1] for t in steady) / seconds if seconds else None,
                   "tokens_per_s": sum(t[2] for t in steady) / seconds if seconds else None,
                   "num_timed_steps": len(steady), "num_compiled_shapes": len(timed) - len(steady)}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def train(cfg: TrainConfig, *, log=print) -> dict:
    """Train a compressor per `cfg`; returns the summary (also in <out>/summary.json)."""
    return Trainer(cfg, log=log).run()
