"""The VQA suite (`python -m kvjax.evaluate --suite vqa`): how much of a VLM's answers about an
image each KV-cache compression method keeps at equal KV memory, on the shipped default VLM by
default, over the test split of `kvjax.scenes`.

Protocol (kvpress's, as in the fidelity suite): the prompt up to the end of the image ("USER: " and
the image features) is prefilled and compressed, then the question ("\\n<question> ASSISTANT:")
is prefilled after it, so no method sees the question, and the answer is generated greedily. CCM
compresses the image span with its image MLPs.

Rows: the full cache ("full"); CCM at each compressor's factor ("ccm:<cf>"); every ratio press at
the KV bytes each CCM row measured and at 50 %; int8 alone, after the strongest CCM and after two
presses. Presses with image protection are not rows: the compressed context is the image, so
protecting it leaves nothing to compress (kv_bytes_ratio 1.0 by construction).

Beside the rows, "blank_image": the full cache's accuracy when each image is replaced by its
background alone, i.e. what the model gets from the question (and its priors) without seeing.

Columns: kv_bytes_ratio (bytes the compressed cache holds / the full cache's, both measured from
the cache after the same context), vqa_acc (and per question kind), agreement (share of replies
identical to the full cache's), kl (KL(full || compressed) of the first answer token).
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict

import numpy as np

from kvjax import evaluation, scenes
from kvjax.cache import KVCache
from kvjax.compression import prefill_and_compress
from kvjax.evaluation import FULL_CACHE, Method
from kvjax.prompts import bucket, eos_ids_of
from kvjax.steps import generate_from, prefill, split
from kvjax.suites.sweep import sweep

PANELS = (("vqa_acc", "VQA accuracy"), ("agreement", "replies equal to the full cache's"))


@dataclasses.dataclass(frozen=True)
class VQAConfig:
    num_scenes: int = 120  # test-split scenes, one question each (the kinds in turn)
    split: str = "test"
    max_new_tokens: int = 8
    batch_size: int = 8  # scenes answered together (one compiled program per method)
    presses: tuple[str, ...] = ()  # the ratio presses compared; () = every one


QUICK = VQAConfig(num_scenes=6, presses=("knorm", "snapkv"))  # CI's run: one press per scoring family


@dataclasses.dataclass(frozen=True)
class VQAPrompt:
    context: np.ndarray  # int32 [1, W]: BOS .. the last image position, padded
    context_len: int
    embeds: object  # [1, W, H]: the context's input embeddings, image features in
    question: np.ndarray  # int32 [1, Q]: "\n<question> ASSISTANT:", padded
    question_len: int
    asked: scenes.Question


def prompts(prompter, cfg: VQAConfig, *, blank: bool = False) -> list[VQAPrompt]:
    """One prompt per test scene, its question the scene's (index mod kinds)-th, embedded once.
    `blank`: the scene's background alone instead of its image (what the question alone gets)."""
    from PIL import Image

    out = []
    image_size = prompter.cfg.vision.image_size
    for i in range(cfg.num_scenes):
        scene, questions = scenes.task(cfg.split, i)
        asked = questions[i % len(questions)]
        image = Image.new("RGB", (image_size, image_size), scene.background) if blank else scene.render(image_size)
        pixels = prompter.pixels(image)
        ids, mask = prompter.encode([{"role": "user", "content": asked.text}], pixels)
        image_len = int(np.flatnonzero(mask)[-1]) + 1
        width, q_width = bucket(image_len, smallest=64), bucket(len(ids) - image_len, smallest=16)
        context, image_mask = np.zeros((1, width), np.int32), np.zeros((1, width), bool)
        context[0, :image_len], image_mask[0, :image_len] = ids[:image_len], mask[:image_len]
        question = np.zeros((1, q_width), np.int32)
        question[0, :len(ids) - image_len] = ids[image_len:]
        out.append(VQAPrompt(context, image_len, prompter.embed(context, image_mask, [pixels]), question,
                             len(ids) - image_len, asked))
    return out


@dataclasses.dataclass(frozen=True)
class VQABatch:
    """Prompts stacked for one call of each step (a short last batch padded with copies of its last
    prompt, so every batch compiles alike); each row keeps its own lengths."""

    context: np.ndarray  # int32 [B, W]
    embeds: np.ndarray  # [B, W, H]
    question: np.ndarray  # int32 [B, Q]
    context_lens: list[int]
    question_lens: list[int]
    num_prompts: int  # the rows that are prompts (the rest are padding)


def _stack(arrays) -> np.ndarray:
    """Rows [1, W, ...] of different widths -> one [N, max W, ...] array, zero-padded on the right."""
    width = max(a.shape[1] for a in arrays)
    return np.concatenate([np.pad(np.asarray(a), [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
                           for a in arrays])


def batched(items: list[VQAPrompt], batch_size: int) -> list[VQABatch]:
    """The prompts batch_size at a time, stacked once for every method of a run."""
    batch_size = min(batch_size, len(items))
    out = []
    for first in range(0, len(items), batch_size):
        chunk = items[first:first + batch_size]
        rows = chunk + [chunk[-1]] * (batch_size - len(chunk))
        out.append(VQABatch(_stack([p.context for p in rows]), _stack([p.embeds for p in rows]),
                            _stack([p.question for p in rows]), [p.context_len for p in rows],
                            [p.question_len for p in rows], len(chunk)))
    return out


def answers(model, tokenizer, batches: list[VQABatch], method: Method, max_new_tokens: int):
    """Per prompt, in order: (reply text, first-answer-token logits [V], KV bytes after compression).
    Each row has its own lengths, so its answer is the one it gets alone."""
    lm = split(model.language_model)
    eos = eos_ids_of(lm.cfg, tokenizer)
    out = []
    for b in batches:
        slots = b.context.shape[1] + b.question.shape[1] + max_new_tokens
        cache = KVCache.for_model(lm.cfg, len(b.context_lens), slots, model.language_model.dtype)
        _, cache = prefill_and_compress(lm, cache, b.context, b.context_lens, b.embeds, method=method.method,
                                        image_len=b.context_lens)
        kv_bytes = cache.used_bytes()
        logits, cache = prefill(lm, cache, b.question, b.question_lens)
        gen = generate_from(lm, cache, logits, max_new_tokens=max_new_tokens, eos_ids=eos)
        for r in range(b.num_prompts):
            reply = tokenizer.decode(gen.tokens[r, :gen.num_generated[r]], skip_special_tokens=True).strip()
            out.append((reply, np.asarray(logits[r], np.float64), int(kv_bytes[r])))
    return out


def accuracy(items: list[VQAPrompt], results) -> dict:
    """{"vqa_acc", "vqa_acc_by_kind"} of the replies in `results` (from `answers`)."""
    by_kind = defaultdict(list)
    for p, (reply, _, _) in zip(items, results):
        by_kind[p.asked.kind].append(p.asked.is_answered_by(reply))
    return {"vqa_acc": float(np.mean([hit for hits in by_kind.values() for hit in hits])),
            "vqa_acc_by_kind": {k: float(np.mean(v)) for k, v in sorted(by_kind.items())}}


def run(model, tokenizer, prompter, compressors=(), cfg: VQAConfig = VQAConfig(), *, progress: bool = True) -> dict:
    """The VQA table of a VLM (the report without the model's name)."""
    start = time.perf_counter()
    items = prompts(prompter, cfg)
    batches = batched(items, cfg.batch_size)
    reference = None

    def score(method: Method) -> dict:
        nonlocal reference
        results = answers(model, tokenizer, batches, method, cfg.max_new_tokens)
        if reference is None:
            reference = results
        _, kl = evaluation.compare(np.stack([r[1] for r in reference]), np.stack([r[1] for r in results]))
        return {"kv_bytes": float(np.mean([r[2] for r in results])), **accuracy(items, results),
                "agreement": float(np.mean([a[0] == b[0] for a, b in zip(results, reference)])),
                "kl": float(np.mean(kl))}

    rows = sweep("vqa", score, compressors, press_names=cfg.presses, progress=progress,
                 summary=lambda row: f"acc {row['vqa_acc']:.2f}")
    # the floor: how often the full cache answers right from the question alone, the image blank
    blank = prompts(prompter, cfg, blank=True)
    blank_image = accuracy(blank, answers(model, tokenizer, batched(blank, cfg.batch_size), FULL_CACHE,
                                          cfg.max_new_tokens))
    return {"suite": "vqa", "config": dataclasses.asdict(cfg), "seconds": time.perf_counter() - start,
            "protocol": "prompt through the image prefilled and compressed (CCM: image MLPs on the image span), then "
                        "the question (kvpress's pipeline); greedy answers; kv_bytes_ratio measured from the cache "
                        "after the image", "blank_image": blank_image, "rows": rows}


def plot(report: dict, path) -> None:
    evaluation.plot(report["rows"], path, x="kv_bytes_ratio", x_label="KV bytes / full cache", panels=PANELS,
                    baseline="full")
