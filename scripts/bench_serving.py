"""Online serving benchmark: Poisson arrivals through `inference.Engine`, baseline vs compressed vs int8 pages.

    python scripts/bench_serving.py --like llama-2-7b --dtype bfloat16 --num-samples 256 --req-per-sec 8   # GPU
    python scripts/bench_serving.py --model-dir DIR --num-samples 32 --req-per-sec 4 --json out.json      # CPU
    python scripts/bench_serving.py --model-dir LLAVA_DIR --dataset llava.json --image-root IMAGES       # a VLM
    python scripts/bench_serving.py --like llava --config scripts/experiments.example.yaml --json out.json

Requests arrive at Poisson times (--req-per-sec; 0 = all at once) and carry `arrival_s`; every
variant (--variants: `baseline`, `ccm` = a randomly initialised CCM compressor with
--compression-factor, or a press `NAME:RATIO` such as `knorm:0.5`; a `+int8` suffix keeps its pages
int8 with float32 scales, a bare name takes --kv-cache-dtype) serves the same requests in the same
run, each on a fresh engine with the same pool: --num-pages pages, or --kv-cache-bytes bytes (then
int8 variants get more pages). A prefill batch holds at most --prefill-batch-size requests, of
which at most --compress-batch-size carry a method; a decode step at most --decoding-batch-size.

Text models: prompts are the first human turn of a LLaVA-style JSON/JSONL (--dataset, `<image>`
dropped) or synthetic ("Hello" x --context-len, the seeds' default); CCM's image span is the first
--image-kv-len tokens. VLMs (LLaVA-1.5, MiniCPM-V-2.6: --model-dir, or --like llava / minicpmv for
the tiny random demos; FastCache's concurrent workload): each request carries its record's image
(--dataset with "image" paths relative to --image-root, default the dataset's folder; without
--dataset, the demo shapes of `training.demo_data`), its prompt built by the model's own prompter
and served as embeddings through the language model; CCM's image span is each prompt's image
prefix. The vision tower runs before the timed run (each prompt's embeddings are computed once,
up front), so TTFT and throughput cover the language model only. Presses compress a VLM's image
tokens like any others: the engine's compress call has no image protection (`protect_image`).

Reported per variant: output tokens/s (all output tokens over the time from the first arrival to
the last finish), TTFT and TPOT p50/p99, peak KV memory (peak pages in use x page bytes), the most
sequences running at once, preemptions. Before timing, each variant serves the requests twice,
untimed (--no-warmup skips it): all at once, then at the timed run's arrival times, so that
compiles land outside the timed run; a batch shape neither met still compiles inside it (on a
slow device, the timed run's p99 shows it).

--config FILE.yaml runs a list of experiments one after another on the one model, each a mapping
of flag names to values overriding the command line (`- {name: ccm-cf5, variants: [ccm],
compression_factor: 5, req_per_sec: 2}`); --json / --png then collect them all.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

# bench_common first: it makes a source checkout importable.
from bench_common import DTYPES, add_model_source, bench_main, pyplot, report_head, save
from bench_common import model_dir_for as text_model_dir_for

import kvjax
from kvjax.cli.common import add_parallel_flags
import numpy as np
from tqdm import tqdm

from bench_vlm_prefill import model_dir_for as vlm_model_dir_for
from inference.engine import Engine
from inference.scheduler import Request
from kvjax.compression.ccm import CompressorConfig, build_compressor
from kvjax.compression.presses import get_press
from kvjax.testing import text as demo
from kvjax.testing import vlm
from kvjax.vision import prompter_for
from training.demo_data import ensure_demo_image_dataset


class ExperimentParser(argparse.ArgumentParser):
    """Parses a --config experiment's flags; a bad value raises instead of exiting."""

    def error(self, message):
        raise kvjax.KVJaxError(message)


def build_parser(parser_class=argparse.ArgumentParser):
    p = parser_class(description=__doc__.splitlines()[0])
    add_model_source(p, "a Hugging Face Llama/Qwen2/Qwen3 (with tokenizer), LLaVA-1.5 or MiniCPM-V-2.6 directory",
                     (*demo.LIKE_PRESETS, *vlm.VLM_PRESETS))
    p.add_argument("--dataset", help="LLaVA-style .json / .jsonl; default: synthetic ('Hello' x --context-len, "
                                     "or demo shape images for a VLM)")
    p.add_argument("--image-root", help="folder the dataset's image paths are relative to (default: its own)")
    p.add_argument("--context-len", type=int, default=640, help="synthetic prompt: this many 'Hello's")
    p.add_argument("--max-prompt-len", type=int, default=2048,
                   help="longer text prompts are cut to this many tokens (an image prompt is refused instead)")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--req-per-sec", type=float, default=4.0, help="Poisson arrival rate; 0 = all at t=0")
    p.add_argument("--max-new-tokens", type=int, default=64)
    add_variant_flags(p, "page pool in bytes, scales counted (not with --num-pages): int8 variants get more pages")
    p.add_argument("--image-kv-len", type=int, default=576,
                   help="CCM image span of a text prompt (cut to each prompt); a VLM's is its image prefix")
    p.add_argument("--compression-factor", type=int, default=5)
    p.add_argument("--min-seq-len", type=int, default=2)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=None, help="page pool (default: max-num-seqs full sequences)")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--prefill-batch-size", type=int, default=4)
    p.add_argument("--compress-batch-size", type=int, default=None,
                   help="rows of a prefill batch that may carry a method (default: --prefill-batch-size)")
    p.add_argument("--decoding-batch-size", type=int, default=32)
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    add_parallel_flags(p, hosts=False)
    p.add_argument("--config", help="YAML list of experiments, each flag: value overrides (see the docstring)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--png", help="plot throughput, latencies and peak KV memory per variant here (needs matplotlib)")
    p.add_argument("--quiet", action="store_true")
    return p


def parse_args(argv):
    return build_parser().parse_args(argv)


def model_dir_for(args) -> Path:
    """--model-dir; --like llava / minicpmv: the tiny demo VLMs (written once under $KVJAX_HOME);
    a real-shaped VLM or text preset: random weights written once into --work-dir."""
    if args.like in vlm.VLM_PRESETS:
        return vlm_model_dir_for(args) if args.like in vlm.LIKE else vlm.ensure_demo_vlm(args.like)
    return text_model_dir_for(args)


def read_samples(path, image_root=None) -> list[tuple[str, Path | None]]:
    """(question, image path or None) of each LLaVA-style record (`conversations` or `messages`):
    its first human/user turn with `<image>` dropped, its "image" under image_root (default: the
    file's folder). Records without such a turn are skipped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise kvjax.KVJaxError(f"--dataset {str(path)!r} does not exist")
    root = Path(image_root).expanduser() if image_root else path.parent
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        entries = ([json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl"
                   else json.loads(text))
    except json.JSONDecodeError as e:
        raise kvjax.KVJaxError(f"--dataset {path}: not valid JSON ({e.msg})")
    samples = []
    for entry in entries if isinstance(entries, list) else []:
        turns = entry.get("conversations", entry.get("messages")) if isinstance(entry, dict) else None
        for turn in turns or []:
            if isinstance(turn, dict) and turn.get("from", turn.get("role")) in ("human", "user"):
                value = turn.get("value", turn.get("content"))
                if isinstance(value, str) and value.replace("<image>", "").strip():
                    image = entry.get("image")
                    samples.append((value.replace("<image>", "").strip(),
                                    root / image if isinstance(image, str) else None))
                break
    if not samples:
        raise kvjax.KVJaxError(f"--dataset {path}: no record with a human/user turn (LLaVA 'conversations' "
                               "or 'messages' list)")
    return samples


@dataclasses.dataclass(frozen=True)
class Prompt:
    ids: list[int]
    image_len: int  # CCM's image span
    embeds: np.ndarray | None = None  # float32 [T, H]: a VLM prompt's LM input embeddings, image features in


def text_prompts(args, tokenizer, vocab_size: int, rng) -> list[Prompt]:
    """--num-samples token-id prompts, cycling through the dataset's questions."""
    if args.dataset:
        texts = [question for question, _ in read_samples(args.dataset, args.image_root)]
        texts = [texts[i % len(texts)] for i in range(args.num_samples)]
    else:
        texts = [" ".join(["Hello"] * args.context_len)] * args.num_samples
    if tokenizer is None:  # no tokenizer in the checkpoint: random ids of the same word count
        ids = [rng.integers(3, vocab_size, max(1, min(len(t.split()), args.max_prompt_len))).tolist() for t in texts]
    else:
        ids = [tokenizer.encode(t)[:args.max_prompt_len] for t in texts]
    return [Prompt(p, min(args.image_kv_len, len(p))) for p in ids]


def image_prompts(args, prompter) -> list[Prompt]:
    """--num-samples image prompts, cycling through the dataset's records; each distinct record's
    embeddings (vision tower + merge) are computed once, here, before anything is timed."""
    samples = read_samples(args.dataset or ensure_demo_image_dataset(), args.image_root)[:args.num_samples]
    prompts = [image_prompt(prompter, question, image, args.max_prompt_len)
               for question, image in tqdm(samples, disable=args.quiet, desc="embed")]
    return [prompts[i % len(prompts)] for i in range(args.num_samples)]


def image_prompt(prompter, question: str, image: Path | None, max_prompt_len: int) -> Prompt:
    if image is not None and not image.is_file():
        raise kvjax.KVJaxError(f"--dataset: image {str(image)!r} does not exist; set --image-root to the folder "
                               "the dataset's image paths are relative to")
    built = prompter.build([question], [None if image is None else prompter.pixels(image)])
    n = int(built.lengths[0])
    if n > max_prompt_len:
        raise kvjax.KVJaxError(f"an image prompt has {n} tokens, more than --max-prompt-len {max_prompt_len}; "
                               "raise it (an image prompt is never cut)")
    return Prompt(built.tokens[0, :n].tolist(), int(built.image_len[0]), np.asarray(built.embeds[0, :n], np.float32))


KV_CACHE_DTYPES = ("auto", "int8")


def add_variant_flags(p, bytes_help: str) -> None:
    """--variants, --kv-cache-dtype and --kv-cache-bytes, as the engine benchmarks share them."""
    p.add_argument("--variants", default="baseline,ccm,ccm+int8",
                   help="comma list: baseline, ccm, NAME:RATIO (a press), each optionally +int8")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="pages of a variant without +int8 (auto: the model's dtype)")
    p.add_argument("--kv-cache-bytes", type=int, default=None, help=bytes_help)


def parse_variants(args) -> dict:
    """--variants -> {name: (method name, page dtype or None)}; also checks --kv-cache-bytes."""
    if args.kv_cache_bytes is not None and args.kv_cache_bytes <= 0:
        raise kvjax.KVJaxError(f"--kv-cache-bytes must be > 0, got {args.kv_cache_bytes}")
    names = {v.strip(): split_variant(v.strip(), args.kv_cache_dtype) for v in args.variants.split(",") if v.strip()}
    if not names:
        raise kvjax.KVJaxError("--variants is empty; give e.g. baseline,ccm,ccm+int8")
    return names


def split_variant(name: str, kv_cache_dtype: str):
    """'ccm+int8' -> ('ccm', 'int8'); a bare name takes kv_cache_dtype ('auto' -> None: the model's dtype)."""
    method, plus, suffix = name.partition("+")
    if plus and suffix not in KV_CACHE_DTYPES:
        raise kvjax.KVJaxError(f"--variants: {name!r}: the suffix after '+' must be one of {KV_CACHE_DTYPES}")
    kv_dtype = suffix if plus else kv_cache_dtype
    return method, None if kv_dtype == "auto" else kv_dtype


def make_method(name: str, cfg, args):
    """None (baseline), a random CCM compressor, or a press NAME:RATIO."""
    if name == "baseline":
        return None
    if name == "ccm":
        return build_compressor(CompressorConfig.for_model(
            cfg, compression_factor=args.compression_factor, min_seq_len=args.min_seq_len,
            dtype=args.dtype))  # random decoupled: speed does not depend on weights
    press, _, ratio = name.partition(":")
    try:
        return get_press(press, compression_ratio=float(ratio or 0.5))
    except (KeyError, ValueError) as e:
        raise kvjax.KVJaxError(f"--variants: {name!r} is not baseline, ccm or a press NAME:RATIO ({e})")


def _percentiles(values) -> dict:
    values = np.asarray(values, np.float64)
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)),
            "mean": float(values.mean())}


def serve(parts, tokenizer, prompts, arrivals, method, kv_dtype, args, *, progress=None) -> dict:
    """All requests through a fresh engine; the serving metrics."""
    engine = Engine(parts, tokenizer=tokenizer, page_size=args.page_size, num_pages=args.num_pages,
                    kv_cache_bytes=args.kv_cache_bytes, kv_cache_dtype=kv_dtype, max_num_seqs=args.max_num_seqs,
                    max_model_len=max(len(p.ids) for p in prompts) + args.max_new_tokens + 1,
                    prefill_batch_size=args.prefill_batch_size, compress_batch_size=args.compress_batch_size,
                    decoding_batch_size=args.decoding_batch_size, eos_ids=(), seed=args.seed)
    requests = [Request(prompt=p.ids, embeds=p.embeds, image_len=p.image_len, max_new_tokens=args.max_new_tokens,
                        compression=method, arrival_s=float(t)) for p, t in zip(prompts, arrivals)]
    start = engine.clock()
    results = engine.generate(requests, progress=progress)
    wall_s = engine.clock() - start
    num_tokens = sum(len(r.token_ids) for r in results)
    span_s = max(float(t) + r.latency_s for t, r in zip(arrivals, results))  # first arrival (t=0) -> last finish
    compressed = [r.compressed_len for r in results if r.compressed_len is not None]
    page_bytes = engine.runner.cache.page_bytes()
    peak_pages = engine.allocator.peak_used
    return {"num_requests": len(results), "output_tokens": num_tokens, "wall_s": wall_s,
            "tokens_per_s": num_tokens / span_s, "requests_per_s": len(results) / span_s,
            "ttft_s": _percentiles([r.ttft_s for r in results]),
            "tpot_s": _percentiles([r.tpot_s for r in results]),
            "latency_s": _percentiles([r.latency_s for r in results]),
            "peak_pages": peak_pages, "num_pages": engine.allocator.num_pages, "peak_kv_bytes": peak_pages * page_bytes,
            "kv_cache_dtype": kv_dtype or "auto", "page_bytes": page_bytes,
            "pool_bytes": page_bytes * engine.allocator.num_pages,
            "max_concurrent_seqs": engine.stats["max_running"],
            "preempted": sum(r.num_preempted for r in results),
            "pages_freed_by_compression": engine.stats["pages_freed_by_compression"],
            "mean_prompt_len": float(np.mean([len(p.ids) for p in prompts])),
            "mean_image_len": float(np.mean([p.image_len for p in prompts])),
            "mean_compressed_len": float(np.mean(compressed)) if compressed else None}


def arrival_times(req_per_sec: float, num: int, rng) -> np.ndarray:
    """Poisson arrival times [num] starting at t=0 (all zeros when req_per_sec is 0)."""
    gaps = rng.exponential(1.0 / req_per_sec, num) if req_per_sec > 0 else np.zeros(num)
    return np.cumsum(gaps) - gaps[0]


def check_flags(args) -> None:
    """Raise the flag errors one can see before loading anything."""
    if min(args.num_samples, args.max_new_tokens, args.page_size, args.context_len, args.max_prompt_len) <= 0:
        raise kvjax.KVJaxError("--num-samples, --max-new-tokens, --page-size, --context-len and "
                               "--max-prompt-len must be > 0")
    if args.kv_cache_bytes is not None and args.num_pages is not None:
        raise kvjax.KVJaxError("--num-pages and --kv-cache-bytes both size the pool; give one")
    if args.req_per_sec < 0:
        raise kvjax.KVJaxError(f"--req-per-sec must be >= 0, got {args.req_per_sec}")
    if args.compress_batch_size is not None and args.compress_batch_size <= 0:
        raise kvjax.KVJaxError(f"--compress-batch-size must be > 0, got {args.compress_batch_size}")
    parse_variants(args)


# Set once per run: one model is loaded and one report written for all experiments.
RUN_FLAGS = ("model_dir", "like", "work_dir", "dtype", "config", "json", "png", "quiet")


def read_experiments(path, argv) -> list[tuple[str, argparse.Namespace]]:
    """--config YAML -> (name, checked flags) per experiment: the command line's flags with the
    entry's overrides (keys are long flag names, `req_per_sec` or `req-per-sec`; a list is a comma list)."""
    import yaml

    try:
        entries = yaml.safe_load(Path(path).expanduser().read_text())
    except (OSError, yaml.YAMLError) as e:
        raise kvjax.KVJaxError(f"--config {path}: cannot read it ({e})")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise kvjax.KVJaxError(f"--config {path}: expected a YAML list of experiments, each a mapping such as "
                               "'- {name: ccm-cf5, variants: [ccm], compression_factor: 5}'")
    experiments = {}
    for index, entry in enumerate(entries):
        overrides = dict(entry)
        name = str(overrides.pop("name", f"experiment-{index}"))
        if name in experiments:
            raise kvjax.KVJaxError(f"--config {path}: two experiments are named {name!r}; give each its own name")
        try:
            experiments[name] = experiment_args(argv, overrides)
            check_flags(experiments[name])
        except kvjax.KVJaxError as e:
            raise kvjax.KVJaxError(f"--config {path}: experiment {name!r}: {e}")
    return list(experiments.items())


def experiment_args(argv, overrides: dict) -> argparse.Namespace:
    """The command line argv re-parsed with overrides {flag: value} appended (later flags win)."""
    base = parse_args(argv)
    tokens, direct = [], {}
    for key, value in overrides.items():
        dest = str(key).replace("-", "_")
        if dest in RUN_FLAGS:
            raise kvjax.KVJaxError(f"{key} is set once for the whole run; give it on the command line")
        if dest not in vars(base):
            raise kvjax.KVJaxError(f"unknown flag {key!r}; use the long flag names of --help, such as req_per_sec")
        if isinstance(getattr(base, dest), bool) or value is None:  # a switch, or a flag back to its default None
            if value is not None and not isinstance(value, bool):
                raise kvjax.KVJaxError(f"{key} is a switch: give true or false, not {value!r}")
            direct[dest] = value
        else:
            tokens += [f"--{dest.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    args = build_parser(ExperimentParser).parse_args([*argv, *tokens])
    vars(args).update(direct)
    return args


def run_experiment(parts, tokenizer, prompter, cfg, args) -> dict:
    """Every variant of one set of (checked) flags on the same prompts and arrivals."""
    names = parse_variants(args)
    rng = np.random.default_rng(args.seed)
    prompts = (image_prompts(args, prompter) if prompter is not None
               else text_prompts(args, tokenizer, cfg.vocab_size, rng))
    arrivals = arrival_times(args.req_per_sec, args.num_samples, rng)
    variants = {}
    for name, (method_name, kv_dtype) in names.items():
        method = make_method(method_name, cfg, args)
        if not args.no_warmup:  # untimed: all at once (the largest batches), then as the timed run arrives
            for warmup_arrivals in (np.zeros(len(prompts)), arrivals):
                serve(parts, tokenizer, prompts, warmup_arrivals, method, kv_dtype, args)
        with tqdm(total=len(prompts), disable=args.quiet, desc=name) as bar:
            variants[name] = serve(parts, tokenizer, prompts, arrivals, method, kv_dtype, args, progress=bar.update)
    return {"arrivals_s": arrivals.tolist(), "variants": variants}


def run(args, argv) -> dict:
    if args.config:
        experiments = read_experiments(args.config, argv)  # each one's flags checked before the model loads
    else:
        check_flags(args)
        experiments = [(None, args)]
    model_dir = model_dir_for(args)
    model, tokenizer, cfg = kvjax.load(model_dir, dtype=args.dtype, tensor_parallel=args.tensor_parallel)
    prompter = prompter_for(model, tokenizer, cfg, model_dir)  # None for a text LM
    lm_cfg = getattr(cfg, "text", cfg)
    parts = kvjax.split(getattr(model, "language_model", model))  # a VLM serves through its LM
    results = {name: run_experiment(parts, tokenizer, prompter, lm_cfg, flags) for name, flags in experiments}
    head = {**report_head(args, argv, lm_cfg, model_dir), "vlm": type(cfg).__name__ if prompter else None}
    if not args.config:
        return {**head, **results[None]}
    overrides = {name: {k: v for k, v in vars(flags).items() if v != getattr(args, k)} for name, flags in experiments}
    return {**head, "experiments": {name: {"overrides": overrides[name], **r} for name, r in results.items()}}


def labelled_rows(report) -> list[tuple[str, dict]]:
    """(label, figures) per variant; under --config the label is 'experiment: variant'."""
    if "experiments" not in report:
        return list(report["variants"].items())
    return [(f"{exp}: {name}", row) for exp, r in report["experiments"].items() for name, row in r["variants"].items()]


def plot(report, path) -> None:
    if (plt := pyplot()) is None:
        return
    labels, rows = zip(*labelled_rows(report))
    x = np.arange(len(labels))
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.5))
    axes[0].bar(x, [r["tokens_per_s"] for r in rows])
    axes[0].set(ylabel="output tokens/s", title="throughput")
    for ax, key, title in ((axes[1], "ttft_s", "TTFT"), (axes[2], "tpot_s", "TPOT")):
        ax.bar(x - 0.2, [1e3 * r[key]["p50"] for r in rows], 0.4, label="p50")
        ax.bar(x + 0.2, [1e3 * r[key]["p99"] for r in rows], 0.4, label="p99")
        ax.set(ylabel="ms", title=title)
        ax.legend()
    axes[3].bar(x, [r["peak_kv_bytes"] / 2**20 for r in rows])
    axes[3].set(ylabel="MiB", title="peak KV memory")
    for ax in axes:
        ax.set_xticks(x, labels, rotation=30, ha="right")  # names such as ccm+int8 overlap flat
    save(fig, path)


def summarize(report) -> None:
    rows = labelled_rows(report)
    width = max(12, *(len(label) for label, _ in rows))
    print(f"{'variant':>{width}}  {'tok/s':>8}  {'TTFT p50/p99 ms':>17}  {'TPOT p50/p99 ms':>17}  {'peak/pages':>10}  "
          f"{'peak KV MiB':>11}  {'max seqs':>8}")
    for label, r in rows:
        print(f"{label:>{width}}  {r['tokens_per_s']:>8.1f}  "
              f"{1e3 * r['ttft_s']['p50']:>8.1f}/{1e3 * r['ttft_s']['p99']:<8.1f}  "
              f"{1e3 * r['tpot_s']['p50']:>8.2f}/{1e3 * r['tpot_s']['p99']:<8.2f}  "
              f"{str(r['peak_pages']) + '/' + str(r['num_pages']):>10}  {r['peak_kv_bytes'] / 2**20:>11.3f}  "
              f"{r['max_concurrent_seqs']:>8}")


main = bench_main(parse_args, run, summarize, plot)


if __name__ == "__main__":
    sys.exit(main())
