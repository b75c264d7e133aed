"""The fidelity suite (`python -m kvjax.evaluate --suite fidelity`): how much of a model's behaviour
each KV-cache compression method keeps at equal KV memory, on the shipped default model by default.

Rows: the full cache ("full"); CCM at each compressor's factor ("ccm:<cf>"); every ratio press at
the KV bytes each CCM row measured and at 50 %; int8 alone, after CCM and after two presses; seed
004's l2_compress (keep 0.8 of every layer but the first two) and streaming_llm (4 sink + 508 recent
tokens). Columns, per row:

- kv_bytes_ratio: bytes the compressed cache holds / bytes of the full cache, both measured from
  the cache after the same context (`KVCache.used_bytes`);
- ppl, next_token_acc: held-out text, `context_len` tokens prefilled and compressed, the next
  `continuation_len` scored one decode step at a time (`evaluation.perplexity`);
- agreement, kl: top-1 agreement and KL(full || compressed) over greedy continuations of held-out
  prompts (`evaluation.agreement`);
- retrieval_acc: exact-match answers to key-value recall tasks (`kvjax.retrieval`) on held-out prose
  at about each of `retrieval_lengths` prompt tokens. As in kvpress's pipeline, the context is
  prefilled and compressed, then the question is prefilled after it, so no method sees the question.

Everything is seeded; the same model and config give the same table.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict

import numpy as np

from kvjax import evaluation, retrieval
from kvjax.cache import KVCache
from kvjax.compression import prefill_and_compress, presses
from kvjax.evaluation import Method
from kvjax.prompts import bucket, encode_chat
from kvjax.session import tail_len
from kvjax.steps import generate_from, prefill, split
from kvjax.suites.sweep import sweep

# Seed 004's methods, sized by their own fields rather than a ratio.
SEED_004 = (("l2_compress", {"keep_ratio": 0.8, "prune_after": 0, "skip_layers": (0, 1)}),
            ("streaming_llm", {"start_size": 4, "recent_size": 508}))
PANELS = (("retrieval_acc", "retrieval accuracy"), ("ppl", "held-out perplexity"),
          ("agreement", "top-1 agreement with the full cache"))


@dataclasses.dataclass(frozen=True)
class FidelityConfig:
    context_len: int = 1024  # perplexity: tokens prefilled, then compressed
    continuation_len: int = 64  # perplexity: tokens scored after compression
    num_windows: int = 4
    num_prompts: int = 4  # agreement: held-out prompts of context_len tokens
    gen_len: int = 16  # agreement: greedy tokens compared per prompt
    retrieval_lengths: tuple[int, ...] = (512, 1024)
    tasks_per_length: int = 16
    num_records: int = 4  # records per recall task
    presses: tuple[str, ...] = ()  # the ratio presses compared; () = every one
    seed: int = 0


# CI's run: a few short examples, and one press per scoring family (keys' norms; the question's attention).
QUICK = FidelityConfig(context_len=256, continuation_len=16, num_windows=1, num_prompts=1, gen_len=8,
                       retrieval_lengths=(256,), tasks_per_length=2, presses=("knorm", "snapkv"))


@dataclasses.dataclass(frozen=True)
class RecallPrompt:
    context: list[int]  # chat prompt through the context: what is compressed
    question: list[int]  # the question and the template's tail, prefilled after compression
    task: retrieval.Task  # what was asked; `task.is_answered_by(reply)` scores the reply
    target_len: int  # the prompt length it was drawn for


def recall_prompts(tokenizer, sentences, cfg: FidelityConfig) -> list[RecallPrompt]:
    """tasks_per_length recall prompts of at most each retrieval length (prose shortened to fit)."""
    out = []
    for target in cfg.retrieval_lengths:
        for i in range(cfg.tasks_per_length):
            seed, num_words = cfg.seed * 1_000_003 + target * 1_000 + i, target
            while True:
                task = retrieval.key_value_recall(sentences, seed, num_records=cfg.num_records, num_words=num_words)
                ids = encode_chat(tokenizer, [{"role": "user", "content": f"{task.context}\n{task.question}"}])
                if len(ids) <= target:
                    break
                num_words = int(num_words * min(0.95, target / len(ids)))
            context = encode_chat(tokenizer, [{"role": "user", "content": f"{task.context}\n"}])
            split_at = len(ids) - tail_len(ids, context)
            out.append(RecallPrompt(ids[:split_at], ids[split_at:], task, target))
    return out


RECALL_MAX_NEW = 16  # generated tokens per recall answer


def recall_widths(p: RecallPrompt) -> tuple[int, int, int]:
    """(context width, question width, cache slots) of a recall prompt, padded to buckets."""
    width, q_width = bucket(len(p.context), smallest=64), bucket(len(p.question), smallest=16)
    return width, q_width, width + q_width + RECALL_MAX_NEW


def recall_accuracy(model, tokenizer, prompts: list[RecallPrompt], method: Method, eos_ids,
                    capacity: int = 0) -> dict[int, float]:
    """Greedy exact-match accuracy per target length, the context compressed before the question;
    `capacity` as in `evaluation.perplexity`."""
    parts = split(model)
    correct = defaultdict(list)
    for p in prompts:
        width, q_width, slots = recall_widths(p)
        cache = KVCache.for_model(parts.cfg, 1, max(slots, capacity), model.dtype)
        tokens, question = np.zeros((1, width), np.int32), np.zeros((1, q_width), np.int32)
        tokens[0, :len(p.context)], question[0, :len(p.question)] = p.context, p.question
        _, cache = prefill_and_compress(parts, cache, tokens, [len(p.context)], method=method.method)
        logits, cache = prefill(parts, cache, question, [len(p.question)])
        out = generate_from(parts, cache, logits, max_new_tokens=RECALL_MAX_NEW, eos_ids=eos_ids)
        text = tokenizer.decode(out.tokens[0, :out.num_generated[0]], skip_special_tokens=True)
        correct[p.target_len].append(p.task.is_answered_by(text))
    return {length: float(np.mean(hits)) for length, hits in correct.items()}


def seed_004_methods() -> list[Method]:
    return [Method(name, "press", None, presses.get_press(name, **fields)) for name, fields in SEED_004]


def run(model, tokenizer, text: str, compressors=(), cfg: FidelityConfig = FidelityConfig(), *,
        progress: bool = True) -> dict:
    """The fidelity table of `model` on held-out `text` (the report without the model's name)."""
    start = time.perf_counter()
    ids = tokenizer.encode(text, add_special_tokens=False)
    stride = max(1, (len(ids) - cfg.context_len) // max(1, cfg.num_prompts))
    agreement_prompts = [ids[i * stride:i * stride + cfg.context_len] for i in range(cfg.num_prompts)]
    recall = recall_prompts(tokenizer, retrieval.sentences(text), cfg)
    eos_ids = tuple(sorted(set(model.cfg.eos_token_ids) | {tokenizer.eos_token_id} - {None}))
    # every cache of the suite has the same slots, so each method compiles its prefill and compress once
    capacity = max([cfg.context_len + cfg.continuation_len, cfg.context_len + cfg.gen_len]
                   + [recall_widths(p)[2] for p in recall])
    reference = None

    def score(method: Method) -> dict:
        nonlocal reference
        ppl = evaluation.perplexity(model, ids, method, context_len=cfg.context_len,
                                    continuation_len=cfg.continuation_len, num_windows=cfg.num_windows,
                                    capacity=capacity)
        agree, reference = evaluation.agreement(model, agreement_prompts, method, gen_len=cfg.gen_len,
                                                reference=reference, capacity=capacity)
        by_length = recall_accuracy(model, tokenizer, recall, method, eos_ids, capacity)
        return {"kv_bytes": ppl["kv_bytes"], "ppl": ppl["ppl"], "next_token_acc": ppl["accuracy"],
                "retrieval_acc": float(np.mean(list(by_length.values()))),
                "retrieval_acc_by_length": {str(k): v for k, v in by_length.items()},
                "agreement": agree["top1_agreement"], "kl": agree["kl"]}

    rows = sweep("fidelity", score, compressors, seed_004_methods(), press_names=cfg.presses, progress=progress,
                 summary=lambda row: f"acc {row['retrieval_acc']:.2f} ppl {row['ppl']:.1f}")
    return {"suite": "fidelity", "config": dataclasses.asdict(cfg), "seconds": time.perf_counter() - start,
            "protocol": "context prefilled and compressed, then the question (kvpress's pipeline); kv_bytes_ratio "
                        "measured from the cache after the perplexity context", "rows": rows}


def plot(report: dict, path) -> None:
    evaluation.plot(report["rows"], path, x="kv_bytes_ratio", x_label="KV bytes / full cache", panels=PANELS,
                    baseline="full")
