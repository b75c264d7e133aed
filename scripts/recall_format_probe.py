"""Probe: does a record's format decide how fast a small Llama learns to bind a code to its name?

Trains a fresh tiny Llama (2 layers, hidden 128, the shipped tokenizer) on dense multi-record recall
only (no prose, no chat template), every record asked once, the loss on the 4 code digits alone, and
prints the teacher-forced digit accuracy on held-out rows of 2, 4 and 8 records every --report-every
steps. Formats:

  A  " The code of Moses is 4821."  asked " What is the code of Moses? The code of Moses is " -> "4821."
     (the kvjax.retrieval format: the name sits 3 tokens before the first digit, " is" and " " between)
  C  " The code of Moses4821."      asked " What is the code of Moses? The code of Moses" -> "4821."
     (the name right before the first digit: a plain induction head finds it)

    python scripts/recall_format_probe.py --format A --steps 1500

Exploratory: figures in docs/benchmarks.md ("Teaching the default model to retrieve").
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

try:
    import kvjax  # noqa: F401  (installed)
except ImportError:  # a source checkout
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax import defaults, retrieval
from kvjax.config import ModelConfig
from kvjax.models.llama import CausalLM
from training import lm

FORMATS = {  # format -> (record, (question and the reply up to the code), answer)
    "A": lambda n, c: (f" The code of {n} is {c}.", f" What is the code of {n}? The code of {n} is ", f"{c}."),
    "C": lambda n, c: (f" The code of {n}{c}.", f" What is the code of {n}? The code of {n}", f"{c}."),
}


def make_batches(tokenizer, fmt: str, seq_len: int):
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731

    def row(rng, num_records):
        names = rng.choice(len(retrieval.NAMES), num_records, replace=False)
        codes = rng.integers(1000, 10000, num_records)
        texts = [FORMATS[fmt](retrieval.NAMES[n], int(c)) for n, c in zip(names, codes)]
        ids = [tokenizer.bos_token_id] + [i for record, _, _ in texts for i in encode(record)]
        weights = [0.0] * len(ids)
        for k in rng.permutation(num_records):  # every record asked, in random order
            question, answer = encode(texts[k][1]), encode(texts[k][2])
            ids += question + answer
            weights += [0.0] * len(question) + [1.0] * 4 + [0.0] * (len(answer) - 4)
        ids, weights = ids[:seq_len + 1], weights[1:seq_len + 1]  # weight t scores target t + 1
        return ids + [0] * (seq_len + 1 - len(ids)), weights + [0.0] * (seq_len - len(weights))

    def batch(seed, batch_size, low, high):
        rng = np.random.default_rng(seed)
        rows = [row(rng, int(rng.integers(low, high + 1))) for _ in range(batch_size)]
        return {"tokens": jnp.asarray(np.array([r[0] for r in rows], np.int32)),
                "weights": jnp.asarray(np.array([r[1] for r in rows], np.float32))}

    return batch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--format", choices=sorted(FORMATS), default="A")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--report-every", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=192)
    p.add_argument("--lr", type=float, default=2e-3)
    args = p.parse_args(argv)
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(defaults.DEFAULT_MODEL))
    batch = make_batches(tokenizer, args.format, args.seq_len)
    cfg = lm.LMConfig(hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=32, lr=args.lr, warmup_steps=100, steps=args.steps)
    graphdef, params = nnx.split(CausalLM(ModelConfig.from_hf_config(cfg.hf_config(tokenizer)), rngs=nnx.Rngs(0)))
    tx = lm.optimizer(cfg)
    opt_state = tx.init(params)

    start = time.time()
    for step in range(args.steps):
        params, opt_state, out = lm.train_step(params, graphdef, opt_state, batch(step, args.batch_size, 2, 8), tx)
        if (step + 1) % args.report_every == 0:
            acc = {n: round(float(lm.digit_accuracy(params, graphdef, batch(10**6 + n, 64, n, n))), 3) for n in (2, 4, 8)}
            print(json.dumps({"format": args.format, "step": step + 1, "loss": round(float(out["loss"]), 3),
                              "digit_acc_by_records": acc, "seconds": round(time.time() - start)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
