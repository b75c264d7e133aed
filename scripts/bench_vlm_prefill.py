"""Time to prefill one image + question on a VLM: preprocessing, vision (+ merge), LM prefill.

    python scripts/bench_vlm_prefill.py --like minicpmv --json bench.json     (tiny demos: llava, minicpmv)
    python scripts/bench_vlm_prefill.py --like minicpm-v-2.6 --dtype bfloat16  (real shapes, random weights:
        llava-1.5-7b, minicpm-v-2.6; written once into --work-dir, ~16 GB each)
    python scripts/bench_vlm_prefill.py --model-dir /models/llava-1.5-7b-hf

Per repeat: `preprocess` = image file -> pixel arrays on the host (CLIP processor / MiniCPM-V
slicing); `vision` = tokenizing the prompt + the jitted vision tower, projector or resampler and
the scatter into the text embeddings; `prefill` = the jitted LM prefill of those embeddings into
an empty cache. One untimed warm-up run compiles everything first; the median repeat is reported.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

# bench_common first: it makes a source checkout importable.
from bench_common import DTYPES, add_model_source, environment, write_outputs

import jax
import kvjax
import numpy as np

from kvjax.testing.vlm import VLM_PRESETS, write_vlm_checkpoint

SAMPLE = Path(__file__).resolve().parents[1] / "assets" / "sample.png"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_source(p, "a Hugging Face LLaVA-1.5 or MiniCPM-V-2.6 directory", VLM_PRESETS)
    p.add_argument("--image", default=str(SAMPLE))
    p.add_argument("--question", default="What is in the picture? Describe every detail.")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported")
    p.add_argument("--dtype", default="float32", help=", ".join(DTYPES))
    p.add_argument("--json", help="write the report here")
    return p.parse_args(argv)


def model_dir_for(args) -> Path:
    if args.model_dir:
        return Path(args.model_dir).expanduser()
    if args.like not in VLM_PRESETS:
        raise kvjax.KVJaxError(f"--like {args.like!r}: choose one of {', '.join(VLM_PRESETS)}")
    path = Path(args.work_dir).expanduser() / f"{args.like}-{args.dtype}"
    if not (path / "config.json").exists():
        print(f"writing random {args.like} weights to {path} (once)", file=sys.stderr)
        write_vlm_checkpoint(path, args.like, dtype=args.dtype)
    return path


def prompt_builder(model_dir, model, tokenizer, cfg):
    """-> (preprocess(image) -> pixels, build(pixels, question) -> MultimodalPrompt): the family's prompter."""
    from kvjax.vision import prompter_for

    prompter = prompter_for(model, tokenizer, cfg, model_dir)
    return prompter.pixels, lambda pixels, question: prompter.build([question], [pixels])


def run(args, argv) -> dict:
    model_dir = model_dir_for(args)
    model, tokenizer, cfg = kvjax.load(model_dir, dtype=args.dtype)
    preprocess, build = prompt_builder(model_dir, model, tokenizer, cfg)
    lm = kvjax.split(model.language_model)

    def once():
        marks = [time.perf_counter()]
        pixels = preprocess(args.image)
        marks.append(time.perf_counter())
        prompt = build(pixels, args.question)
        jax.block_until_ready(prompt.embeds)
        marks.append(time.perf_counter())
        cache = kvjax.KVCache.for_model(cfg.text, 1, prompt.tokens.shape[1], model.dtype)
        logits, cache = kvjax.prefill(lm, cache, prompt.tokens, prompt.lengths, embeds=prompt.embeds)
        jax.block_until_ready(logits)
        marks.append(time.perf_counter())
        return np.diff(marks) * 1e3, prompt

    once()  # compile
    runs = [once() for _ in range(args.repeats)]
    phases = ("preprocess", "vision", "prefill")
    ms = {name: [float(r[0][i]) for r in runs] for i, name in enumerate(phases)}
    median = {name: statistics.median(v) for name, v in ms.items()}
    median["total"] = statistics.median([float(r[0].sum()) for r in runs])
    prompt = runs[0][1]
    info = {"family": type(cfg).__name__, "prompt_tokens": int(prompt.lengths[0]),
            "padded_tokens": int(prompt.tokens.shape[1]), "image_len": int(prompt.image_len[0]),
            "image_tokens": int(prompt.image_mask[0].sum()), "lm_layers": cfg.text.num_layers,
            "lm_hidden": cfg.text.hidden_size, "vision_layers": cfg.vision.num_layers}
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    return {"settings": dict(settings, model_dir=str(model_dir)), "model": info,
            "environment": environment(argv), "ms": ms, "median_ms": median}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        if args.repeats <= 0 or args.dtype not in DTYPES:
            raise kvjax.KVJaxError(f"--repeats must be > 0 and --dtype one of {', '.join(DTYPES)}")
        report = run(args, argv)
    except kvjax.KVJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m, med = report["model"], report["median_ms"]
    print(f"{m['family']}: prompt {m['prompt_tokens']} tokens ({m['image_tokens']} image, image_len "
          f"{m['image_len']}, padded {m['padded_tokens']})")
    print("median ms: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()))
    write_outputs(report, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
