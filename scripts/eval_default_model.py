"""Held-out figures of a model trained by scripts/train_default_model.py: test-split perplexity beside
unigram and bigram baselines of the same tokenizer (add-one smoothed, counted on the train split),
and greedy retrieval accuracy (kvjax.retrieval key-value recall and needles on test-split prose)
at about 512 and 1024 prompt tokens.

    python scripts/eval_default_model.py --model-dir ~/.cache/kvjax/default-lm/export \
        --work-dir ~/.cache/kvjax/default-lm --json docs/default_model_cpu.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

try:
    import kvjax
except ImportError:  # a source checkout
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    import kvjax

import numpy as np
from tqdm import tqdm

from kvjax import retrieval
from training import lm


def ngram_ppl(train_ids: np.ndarray, test_ids: np.ndarray, vocab: int) -> dict:
    unigram = np.bincount(train_ids, minlength=vocab) + 1.0
    uni_logp = np.log(unigram / unigram.sum())
    pairs = np.zeros((vocab, vocab))
    np.add.at(pairs, (train_ids[:-1], train_ids[1:]), 1.0)
    pairs += 1.0
    bi_logp = np.log(pairs / pairs.sum(1, keepdims=True))
    return {"unigram_ppl": float(np.exp(-uni_logp[test_ids].mean())),
            "bigram_ppl": float(np.exp(-bi_logp[test_ids[:-1], test_ids[1:]].mean()))}


def model_ppl(model, cfg, test_ids: np.ndarray, window: int) -> float:
    nll = []
    for start in range(0, len(test_ids) - window, window):
        ids = test_ids[start:start + window + 1]
        logits, _ = kvjax.prefill(model, kvjax.KVCache.for_model(cfg, 1, window), ids[None, :-1], all_logits=True)
        logp = np.asarray(logits[0], np.float64)
        logp -= logp.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll.extend(-logp[np.arange(window), ids[1:]])
    return float(np.exp(np.mean(nll)))


def recall_accuracy(model, tokenizer, sentences, num_words: int, num_tasks: int, kind: str) -> dict:
    correct, lengths = 0, []
    for i in tqdm(range(num_tasks), desc=f"{kind} {num_words} words", file=sys.stderr, leave=False):
        task = (retrieval.key_value_recall(sentences, 50_000 + i, num_words=num_words) if kind == "recall"
                else retrieval.needle(sentences, 60_000 + i, depth=i / max(num_tasks - 1, 1), num_words=num_words))
        answer, prompt_len = lm.greedy_answer(model, tokenizer, task)
        lengths.append(prompt_len)
        correct += task.is_answered_by(answer)
    return {"accuracy": correct / num_tasks, "mean_prompt_tokens": float(np.mean(lengths)), "num_tasks": num_tasks}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--work-dir", required=True, help="the training work dir (its corpus/ splits)")
    p.add_argument("--num-tasks", type=int, default=40)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--json")
    args = p.parse_args(argv)
    model, tokenizer, cfg = kvjax.load(args.model_dir, dtype="float32")
    corpus = pathlib.Path(args.work_dir).expanduser() / "corpus"
    train_text, test_text = (corpus / "train.txt").read_text(), (corpus / "test.txt").read_text()
    encode = lambda text: np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)  # noqa: E731
    train_ids, test_ids = encode(train_text), encode(test_text)
    report = {"model_dir": args.model_dir, **ngram_ppl(train_ids, test_ids, cfg.vocab_size),
              "model_ppl": model_ppl(model, cfg, test_ids, args.window), "window": args.window, "retrieval": {}}
    sentences = retrieval.sentences(test_text)
    tokens_per_word = len(test_ids) / len(test_text.split())
    for kind in ("recall", "needle"):
        for target in (512, 1024):  # prompt tokens, about
            num_words = int((target - 40) / tokens_per_word)
            report["retrieval"][f"{kind}@{target}"] = recall_accuracy(model, tokenizer, sentences, num_words,
                                                                      args.num_tasks, kind)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        pathlib.Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
