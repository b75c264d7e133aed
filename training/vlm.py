"""Training kvjax's default VLM: a LLaVA-1.5-architecture model (a small CLIP ViT from scratch, the
2-layer MLP projector, and a Llama LM started from the shipped text model) on the synthetic scenes
of `kvjax.scenes`, then export in HF LLaVA layout.

The run's work dir holds a `model/` template (config.json, tokenizer with `<image>`,
preprocessor_config.json, chat template): the prompts of training are the prompts chat builds
from that directory (kvjax.vision's LLaVA prompter), and the export is that template plus
the weights. Batches depend only on (seed, step), so a resumed run sees the batches it would have.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kvjax import scenes
from kvjax.errors import KVJaxError
from kvjax.models.llava import scatter_features
from training import lm

IMAGE_TOKEN = "<image>"
# LLaVA-1.5's turn format (kvjax.vision.llava.render_llava) as a Jinja template, for other tools;
# kvjax itself renders LLaVA prompts in code.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] != 'system' %}{{ m['role'].upper() + ': ' }}"
                 "{% endif %}{% if loop.first and m['role'] == 'user' %}<image>\n{% endif %}{{ m['content'] + ' ' }}"
                 "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@dataclasses.dataclass(frozen=True, slots=True)
class VLMConfig:
    lm_from: str = "kvjax/assets/default-llama"  # the text model the LM starts from (HF directory)
    image_size: int = 112  # (112 / 14)^2 = 64 image tokens
    patch_size: int = 14
    vision_hidden_size: int = 128
    vision_intermediate_size: int = 512
    vision_layers: int = 4  # LLaVA reads the second-to-last layer's output
    vision_heads: int = 4
    batch_size: int = 16  # scenes per step
    questions: int = 3  # questions per scene, as follow-up turns
    list_share: float = 0.5  # rows that also ask scenes.LIST_QUESTION (at a random turn)
    seq_len: int = 192  # tokens per row (longer rows drop their last questions)
    steps: int = 3000
    lr: float = 1e-3  # vision tower and projector
    lm_lr_scale: float = 0.3  # the pretrained LM learns at lr x this
    warmup_steps: int = 100
    cell_loss: float = 1.0  # weight of the training-only per-patch loss (cell_head); 0 turns it off
    init_from: str = ""  # another run's work dir or an exported model: start from its weights (fresh optimizer)
    seed: int = 0


def tokenizer_for(cfg: VLMConfig):
    """The text model's tokenizer plus the `<image>` placeholder, with the LLaVA chat template."""
    from transformers import AutoTokenizer

    source = pathlib.Path(cfg.lm_from).expanduser()
    if not (source / "config.json").is_file():
        raise KVJaxError(f"--lm-from {source}: no config.json there; pass an HF text-model directory "
                         "(default: kvjax/assets/default-llama)")
    tok = AutoTokenizer.from_pretrained(str(source))
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def hf_config(cfg: VLMConfig, tokenizer):
    """transformers LlavaConfig: the text model's config with room for `<image>`, a small CLIP."""
    import transformers

    text = transformers.AutoConfig.from_pretrained(str(pathlib.Path(cfg.lm_from).expanduser()))
    text.vocab_size = -(-len(tokenizer) // 64) * 64  # room for <image>, padded to a multiple of 64
    vision = transformers.CLIPVisionConfig(
        hidden_size=cfg.vision_hidden_size, intermediate_size=cfg.vision_intermediate_size,
        num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads, image_size=cfg.image_size,
        patch_size=cfg.patch_size, projection_dim=text.hidden_size)
    out = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_seq_length=(cfg.image_size // cfg.patch_size) ** 2, pad_token_id=tokenizer.pad_token_id,
        dtype="bfloat16")
    out.architectures = ["LlavaForConditionalGeneration"]
    return out


def write_template(cfg: VLMConfig, folder: pathlib.Path) -> pathlib.Path:
    """The model directory without weights (config, tokenizer, image processor), once."""
    if (folder / "preprocessor_config.json").is_file():
        return folder
    tok = tokenizer_for(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    hf_config(cfg, tok).save_pretrained(folder)
    size = cfg.image_size
    processor = dict(image_processor_type="CLIPImageProcessor", do_resize=True, size={"shortest_edge": size},
                     resample=3, do_center_crop=True, crop_size={"height": size, "width": size}, do_rescale=True,
                     rescale_factor=1 / 255, do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                     do_convert_rgb=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return folder


def new_model(cfg: VLMConfig, template: pathlib.Path):
    """(LlavaModel with a random vision tower and projector and the text model's LM weights,
    its kvjax config, tokenizer)."""
    import kvjax
    from kvjax.loading.hf import hf_config as read_hf_config
    from kvjax.config import ModelConfig
    from kvjax.models.llava import LlavaConfig, LlavaModel

    from transformers import AutoTokenizer

    hf = read_hf_config(template, json.loads((template / "config.json").read_text()))
    vlm_cfg = LlavaConfig.from_hf_config(hf, ModelConfig.from_hf_config(hf.text_config))
    model = LlavaModel(vlm_cfg, rngs=nnx.Rngs(cfg.seed))
    text, _, _ = kvjax.load(pathlib.Path(cfg.lm_from).expanduser(), "float32", tokenizer=False)
    source = dict(nnx.to_flat_state(nnx.state(text, nnx.Param)))
    target = nnx.state(model.language_model, nnx.Param)
    flat = dict(nnx.to_flat_state(target))
    if set(source) != set(flat):
        raise KVJaxError(f"--lm-from {cfg.lm_from}: its parameters do not match the VLM's language model")
    rng = np.random.default_rng(cfg.seed)
    for path, var in flat.items():
        value = np.asarray(source[path].get_value(), np.float32)
        want = var.get_value().shape
        if value.shape != want:  # the embedding, grown for <image>: new rows near the mean row
            extra = value.mean(0) + 0.02 * rng.standard_normal((want[0] - value.shape[0], value.shape[1]))
            value = np.concatenate([value, extra.astype(np.float32)])
        var.set_value(jnp.asarray(value))
    nnx.update(model.language_model, nnx.from_flat_state(flat))
    return model, vlm_cfg, AutoTokenizer.from_pretrained(str(template))


class Batches:
    """Deterministic rows: a training-split scene's image and `questions` of its questions as
    turns ("USER: <image>\\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>..."), loss on the answers."""

    def __init__(self, prompter, tokenizer, cfg: VLMConfig):
        self.prompter, self.tokenizer, self.cfg = prompter, tokenizer, cfg

    def row(self, index: int, rng: np.random.Generator, split: str = "train"):
        """(ids, [start, end) answer spans, pixels, scene) of scene `index` of a split."""
        scene, questions = scenes.task(split, index)
        asked = [questions[i] for i in rng.permutation(len(questions))[:self.cfg.questions]]
        if rng.random() < self.cfg.list_share:  # the whole scene in words: what and where at once
            turn = int(rng.integers(len(asked) + 1))
            asked.insert(turn, scenes.Question("list", scenes.LIST_QUESTION, scenes.listing(scene)))
        pixels = self.prompter.pixels(scene.render(self.cfg.image_size))
        ids, _ = self.prompter.encode([{"role": "user", "content": asked[0].text}], pixels)
        ids, spans = list(ids), []
        for i, q in enumerate(asked):
            if i:
                ids += self.tokenizer(f"USER: {q.text} ASSISTANT:", add_special_tokens=False)["input_ids"]
            answer = self.tokenizer(" " + q.answer, add_special_tokens=False)["input_ids"]
            answer.append(self.tokenizer.eos_token_id)
            spans.append((len(ids), len(ids) + len(answer)))
            ids += answer
        return ids, spans, pixels, scene

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        """tokens int32 [B, T + 1], weights float32 [B, T], image_mask bool [B, T], pixels [B, 3, S, S],
        cells int32 [B, P] (scenes.patch_cells of each row's scene, P image tokens)."""
        cfg, pad = self.cfg, self.tokenizer.pad_token_id
        rng = np.random.default_rng((cfg.seed, step))
        tokens = np.full((cfg.batch_size, cfg.seq_len + 1), pad, np.int32)
        weights = np.zeros((cfg.batch_size, cfg.seq_len), np.float32)
        pixels, cells, side = [], [], cfg.image_size // cfg.patch_size
        for b in range(cfg.batch_size):
            index = int(rng.integers(10_000_000))
            ids, spans, image, scene = self.row(index, rng)
            cells.append(scenes.patch_cells(scene, side))
            spans = [(a, e) for a, e in spans if e <= cfg.seq_len + 1]
            if not spans:
                raise KVJaxError(f"--seq-len {cfg.seq_len} is too short for one image and one question "
                                 f"({len(ids)} tokens); raise it")
            ids = ids[:spans[-1][1]]
            tokens[b, :len(ids)] = ids
            for a, e in spans:  # target t is token t + 1
                weights[b, a - 1:e - 1] = 1.0
            pixels.append(image)
        image_mask = self.prompter.image_mask(tokens[:, :-1].reshape(-1)).reshape(cfg.batch_size, cfg.seq_len)
        return {"tokens": tokens, "weights": weights, "image_mask": image_mask,
                "pixels": np.stack(pixels).astype(np.float32), "cells": np.stack(cells)}


def optimizer(cfg: VLMConfig, params) -> optax.GradientTransformation:
    """AdamW with warmup and cosine decay; the pretrained LM at lm_lr_scale of the new parts' rate."""

    def adamw(peak):
        schedule = optax.warmup_cosine_decay_schedule(0.0, peak, cfg.warmup_steps,
                                                      max(cfg.steps, cfg.warmup_steps + 1), peak * 0.1)
        return optax.adamw(schedule, weight_decay=0.05)

    def label(path, _):
        keys = [str(getattr(p, "key", p)) for p in path]
        return "lm" if keys[:2] == ["model", "language_model"] else "new"

    labels = jax.tree_util.tree_map_with_path(label, params)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.multi_transform({"lm": adamw(cfg.lr * cfg.lm_lr_scale), "new": adamw(cfg.lr)}, labels))


def train_params(model, seed: int = 0) -> dict:
    """What training updates: {"model": the VLM's parameters, "cell_head": a linear probe on the
    projected image tokens that names each patch's grid cell content (scenes.patch_cells)}.

    The probe is training-only (never exported): it gives the vision tower a dense signal per patch
    (what is where), where the answers alone give a few tokens per scene."""
    hidden, classes = model.cfg.text.hidden_size, scenes.cell_classes()
    kernel = jax.random.normal(jax.random.key(seed), (hidden, classes), jnp.float32) / np.sqrt(hidden)
    return {"model": nnx.state(model, nnx.Param), "cell_head": {"kernel": kernel, "bias": jnp.zeros(classes)}}


def _loss(params, graphdef, batch, cell_loss: float):
    model = nnx.merge(graphdef, params["model"])
    inputs = batch["tokens"][:, :-1]
    features = model.image_features(batch["pixels"])  # [B, P, H]: one image per row
    embeds = scatter_features(model.language_model.embed(inputs), features.reshape(-1, features.shape[-1]),
                              batch["image_mask"])
    lm_graphdef, lm_params = nnx.split(model.language_model)
    loss, nll = lm.token_loss(lm_graphdef, lm_params, batch["tokens"], batch["weights"], embeds)
    if cell_loss:
        head = params["cell_head"]
        logits = features @ head["kernel"] + head["bias"]
        loss = loss + cell_loss * optax.softmax_cross_entropy_with_integer_labels(logits, batch["cells"]).mean()
    return loss, nll


def make_train_step(cfg: VLMConfig):
    """The jitted step over train_params (lm.make_train_step with this config's cell loss)."""
    return lm.make_train_step(functools.partial(_loss, cell_loss=cfg.cell_loss))


def answer(model, prompter, tokenizer, question: str, pixels, max_new_tokens: int = 8) -> str:
    """The model's greedy reply to one question about one image (full cache)."""
    import kvjax

    prompt = prompter.build([question], [pixels])
    cache = kvjax.KVCache.for_model(model.cfg.text, 1, prompt.tokens.shape[1] + max_new_tokens)
    out = kvjax.generate(model.language_model, cache, prompt.tokens, prompt.lengths, prompt.embeds,
                         max_new_tokens=max_new_tokens, eos_ids=(tokenizer.eos_token_id,))
    return tokenizer.decode(out.tokens[0, :out.num_generated[0]], skip_special_tokens=True).strip()


def export(model, template: pathlib.Path, out_dir, extra: dict) -> pathlib.Path:
    """The template directory plus bf16 weights under the hub's LLaVA names."""
    import shutil

    import ml_dtypes
    import transformers
    from safetensors.numpy import save_file

    from kvjax.testing.vlm import clip_specs

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for file in template.iterdir():
        shutil.copy2(file, out / file.name)
    tensors = {}
    for name, value in lm.hf_tensors(model).items():
        if name.startswith("vision_tower."):
            name = "vision_tower.vision_model." + name.removeprefix("vision_tower.")
        tensors[name] = value.astype(ml_dtypes.bfloat16)
    # kvjax never builds what LLaVA never reads (CLIP layers after the feature layer, post_layernorm);
    # transformers expects them: zero weights (an identity pre-LN layer) and unit norms.
    vision = transformers.AutoConfig.from_pretrained(str(template)).vision_config
    for name, shape, kind in clip_specs(vision, "vision_tower.vision_model."):
        if name not in tensors:
            tensors[name] = (np.ones if kind == "norm" else np.zeros)(shape, ml_dtypes.bfloat16)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "training.json").write_text(json.dumps(extra, indent=2) + "\n")
    return out


def accuracy(model, vlm_cfg, tokenizer, template, split: str = "validation", num_scenes: int = 24) -> dict:
    """Greedy VQA accuracy over num_scenes scenes of a split, one question each (kinds in turn)."""
    from kvjax.vision import prompter_for

    prompter = prompter_for(model, tokenizer, vlm_cfg, template)
    correct = {}
    for i in range(num_scenes):
        scene, questions = scenes.task(split, i)
        q = questions[i % len(questions)]
        reply = answer(model, prompter, tokenizer, q.text, prompter.pixels(scene.render(vlm_cfg.vision.image_size)))
        correct.setdefault(q.kind, []).append(q.is_answered_by(reply))
    every = [c for kind in correct.values() for c in kind]
    return {"vqa_acc": float(np.mean(every)), **{f"acc_{k}": float(np.mean(v)) for k, v in sorted(correct.items())}}


def train(work: pathlib.Path, cfg: VLMConfig, *, save_every: int, eval_every: int, stop_after: int | None = None,
          quiet: bool = False):
    """Train to cfg.steps, resuming from WORK/checkpoints -> the model, or None when stop_after
    ended the run first."""
    from kvjax.vision import prompter_for
    from training import loop

    template = write_template(cfg, work / "model")
    model, vlm_cfg, tokenizer = new_model(cfg, template)
    batches = Batches(prompter_for(model, tokenizer, vlm_cfg, template), tokenizer, cfg)
    graphdef = nnx.graphdef(model)
    params = train_params(model, cfg.seed)
    tx, train_step = optimizer(cfg, params), make_train_step(cfg)

    def step_fn(state, step):
        params, opt_state, out = train_step(state["params"], graphdef, state["opt_state"], batches(step), tx)
        return {"params": params, "opt_state": opt_state}, out

    def validate(state):
        return accuracy(nnx.merge(graphdef, state["params"]["model"]), vlm_cfg, tokenizer, template)

    def init(state):
        weights = initial_params(pathlib.Path(cfg.init_from).expanduser(), state)
        return {"params": {**state["params"], "model": weights}, "opt_state": state["opt_state"]}

    state = loop.run_steps(work, dataclasses.asdict(cfg), {"params": params, "opt_state": tx.init(params)}, step_fn,
                           steps=cfg.steps, save_every=save_every, eval_every=eval_every, validate=validate,
                           init=init if cfg.init_from else None, stop_after=stop_after, quiet=quiet)
    return None if state is None else nnx.merge(graphdef, state["params"]["model"])


def initial_params(source: pathlib.Path, template: dict):
    """The weights of an exported VLM directory or of another run's latest checkpoint (same shapes)."""
    import kvjax
    from training import loop

    if (source / "config.json").is_file():
        model, _, _ = kvjax.load(source, "float32", tokenizer=False)
        params = nnx.state(model, nnx.Param)
    else:
        params = loop.latest_state(source, template)[0]["params"]["model"]
    want = template["params"]["model"]
    if jax.tree.structure(params) != jax.tree.structure(want) or any(
            a.shape != b.shape for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want))):
        raise KVJaxError(f"--init-from {source}: that model's shape differs from this run's flags")
    return params


def latest_model(work: pathlib.Path, cfg: VLMConfig):
    """(the model at WORK's latest checkpoint, its step)."""
    from training import loop

    model, _, _ = new_model(cfg, write_template(cfg, work / "model"))
    params = train_params(model, cfg.seed)
    state, step = loop.latest_state(work, {"params": params, "opt_state": optimizer(cfg, params).init(params)})
    return nnx.merge(nnx.graphdef(model), state["params"]["model"]), step
