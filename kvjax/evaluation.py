"""Quality of a compressed KV cache: perplexity of a long text and agreement with the full cache.

Methods are spelled as on `python -m kvjax.evaluate --methods`: `none`, `int8`, a press name with
ratios (`knorm:0.25,0.5`), or `ccm:FACTOR` (a CCM compressor; untrained unless one is given); a
`+int8` suffix on a press or ccm spec (`knorm:0.5+int8`) quantizes what it kept.

- `perplexity`: over sliding windows of the text, prefill `context_len` tokens, compress, then
  score the next `continuation_len` tokens one decode step at a time (teacher forcing), as seed
  004's evaluate_with_compression: PPL, next-token accuracy, TTFT (prefill + compress), TPOT.
- `agreement`: per prompt, greedy-generate with the full cache, then feed the same tokens through
  the compressed cache: top-1 agreement and KL(full || compressed) per generated token.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache import KVCache
from kvjax.compression import Int8KV, prefill_and_compress, presses
from kvjax.compression.ccm import CompressorConfig, build_compressor
from kvjax.compression.checkpoint import load_compressor
from kvjax.errors import KVJaxError
from kvjax.steps import decode_step, prefill, split


@dataclasses.dataclass(frozen=True)
class Method:
    """One point of a sweep: `label` names it, `ratio` is its nominal compression ratio (x axis;
    None: measured, for presses sized by their own parameters such as l2_compress)."""

    label: str
    family: str  # "none" | "int8" | "press" | "ccm"
    ratio: float | None
    method: Any = None  # the press, compressor, Int8KV() or (press or compressor, Int8KV()) for kvjax.compress
    is_quantized: bool = False  # a press or ccm followed by int8 (`+int8`)


FULL_CACHE = Method("none", "none", 0.0)  # no compression: the reference every sweep starts from


def parse_methods(specs, model_cfg=None, *, compressor_dir=None, model_dir=None,
                  press_options: dict | None = None) -> list[Method]:
    """['knorm:0.25,0.5', 'int8', 'ccm:5'] -> Methods. A `none` baseline is always first.
    press_options go to every press that has a field of that name; model_dir: the weights the
    compressor in compressor_dir should have been distilled against."""
    methods = [FULL_CACHE]
    for spec in specs:
        base, plus, suffix = spec.partition("+")
        if plus and (suffix != "int8" or base.partition(":")[0] in ("none", "int8")):
            raise KVJaxError(f"bad method {spec!r}: only a press or ccm spec takes a suffix, and only +int8, "
                             "e.g. knorm:0.5+int8")
        first = len(methods)
        name, _, args = base.partition(":")
        values = [a for a in args.split(",") if a] if args else []
        if name == "none":
            continue
        if name == "int8":
            methods.append(Method("int8", "int8", 0.0, Int8KV()))
        elif name == "ccm":
            for factor in values or [None]:
                if factor is not None and not (factor.isdigit() and int(factor) >= 1):
                    raise KVJaxError(f"ccm takes compression factors >= 1, e.g. ccm:5; got {spec!r}")
                factor = None if factor is None else int(factor)
                comp = (load_compressor(compressor_dir, model_cfg, compression_factor=factor, model_dir=model_dir)
                        if compressor_dir
                        else build_compressor(CompressorConfig.for_model(model_cfg, compression_factor=factor)))
                cf = comp.cfg.compression_factor
                methods.append(Method(f"ccm:{cf}", "ccm", 1 - 1 / cf, comp))
        elif name in presses.PRESSES:
            fields = {f.name for f in dataclasses.fields(presses.PRESSES[name])}
            options = {k: v for k, v in (press_options or {}).items() if k in fields}  # e.g. window_size
            if "compression_ratio" not in fields:  # seed 004's methods: sized by their own fields
                if values:
                    raise KVJaxError(f"press {name!r} has no compression ratio: write it as {name!r} and set its "
                                     f"fields with --press-option (e.g. {sorted(fields - {'seed'})[0]}=...)")
                methods.append(Method(name, "press", None, presses.get_press(name, **options)))
            elif not values:
                raise KVJaxError(f"press {name!r} needs compression ratios, e.g. {name}:0.25,0.5")
            for value in values:
                try:
                    ratio = float(value)
                except ValueError:
                    raise KVJaxError(f"compression ratio {value!r} in {spec!r} is not a number") from None
                press = presses.get_press(name, compression_ratio=ratio, **options)
                methods.append(Method(f"{name}:{value}", "press", ratio, press))
        else:
            known = ", ".join(["none", "int8", "ccm"] + presses.list_presses())
            raise KVJaxError(f"unknown method {name!r} in --methods; choose from {known} (a press or ccm "
                             "may end in +int8)")
        if plus:  # every ratio/factor of this spec, then int8
            methods[first:] = [dataclasses.replace(m, label=m.label + "+int8", is_quantized=True,
                                                   method=(m.method, Int8KV())) for m in methods[first:]]
    return methods


def _prefill_with(model, cache: KVCache, tokens, lengths, method: Method):
    """Prefill an empty cache with a padded prompt [B, T] and apply `method` -> (logits [B, V], cache)."""
    return prefill_and_compress(model, cache, tokens, lengths, method=method.method)


def _timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def _forced_logits(model, cache, first_logits, tokens, timings=None) -> np.ndarray:
    """Feed tokens [N] one decode step at a time after a prompt -> logits float32 [N, V] (row i
    predicts tokens[i]; row 0 is the prefill's)."""
    rows = [first_logits]
    for token in tokens[:-1]:
        (logits, cache), seconds = _timed(decode_step, model, cache, np.array([token], np.int32))
        rows.append(logits)
        if timings is not None:
            timings.append(seconds)
    return np.asarray(jnp.concatenate(rows, axis=0))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def token_scores(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """logits [N, V] (row i predicts targets[i]) -> (NLL [N] of the targets, top-1 correct bool [N])."""
    logp = _log_softmax(np.asarray(logits, np.float64))
    targets = np.asarray(targets)
    return -logp[np.arange(len(targets)), targets], logp.argmax(-1) == targets


def compare(full_logits: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (top-1 agreement bool [N], KL(full || compressed) [N]): the full cache's distribution
    is the reference the compressed one is scored against."""
    full, ours = _log_softmax(np.asarray(full_logits, np.float64)), _log_softmax(np.asarray(logits, np.float64))
    return ours.argmax(-1) == full.argmax(-1), (np.exp(full) * (full - ours)).sum(-1)


def perplexity(model, token_ids, method: Method, *, context_len: int, continuation_len: int,
               num_windows: int = 1, capacity: int = 0) -> dict:
    """PPL / next-token accuracy of the text's continuations after a compressed context, with timings.
    `capacity`: cache slots if more than the window needs (one cache shape, one compile, across calls)."""
    parts = split(model)
    window = context_len + continuation_len
    if len(token_ids) < window:
        raise KVJaxError(f"the text has {len(token_ids)} tokens, fewer than --context-len + --continuation-len "
                         f"= {window}; use a longer text or smaller lengths")
    starts = np.linspace(0, len(token_ids) - window, num_windows).astype(int)
    nll, correct, ttft, tpot, kv_bytes = [], [], [], [], []
    for start in starts:
        ids = np.asarray(token_ids[start:start + window], np.int32)
        cache = KVCache.for_model(parts.cfg, 1, max(window, capacity), model.dtype)
        (logits, cache), seconds = _timed(_prefill_with, parts, cache, ids[None, :context_len],
                                          np.array([context_len], np.int32), method)
        ttft.append(seconds)
        kv_bytes.append(int(cache.used_bytes()[0]))
        target = ids[context_len:]
        row_nll, row_correct = token_scores(_forced_logits(parts, cache, logits, target, tpot), target)
        nll.extend(row_nll)
        correct.extend(row_correct)
    return {"ppl": float(np.exp(np.mean(nll))), "nll": float(np.mean(nll)), "accuracy": float(np.mean(correct)),
            "ttft_s": float(np.median(ttft)), "tpot_s": float(np.median(tpot)) if tpot else None,
            "kv_bytes": int(np.mean(kv_bytes)), "num_scored": len(nll)}


def agreement(model, prompts, method: Method, *, gen_len: int, reference: list | None = None,
              capacity: int = 0) -> tuple[dict, list]:
    """Top-1 agreement and KL(full || compressed) over `gen_len` greedy tokens per prompt (token id
    lists). `reference` (from a previous call's second return value) skips the full-cache runs;
    `capacity` as in `perplexity`."""
    parts = split(model)
    width = max(len(p) for p in prompts)
    max_len = max(width + gen_len, capacity)
    if reference is None:
        reference = []
        for prompt in prompts:
            tokens, lengths = _padded(prompt, width)
            logits, cache = prefill(parts, KVCache.for_model(parts.cfg, 1, max_len, model.dtype), tokens, lengths)
            generated, rows = [], [np.asarray(logits)]
            for _ in range(gen_len):
                generated.append(int(rows[-1][0].argmax()))
                logits, cache = decode_step(parts, cache, np.array(generated[-1:], np.int32))
                rows.append(np.asarray(logits))
            reference.append((generated, np.concatenate(rows[:-1])))
    agree, kl = [], []
    for prompt, (generated, ref_logits) in zip(prompts, reference):
        tokens, lengths = _padded(prompt, width)
        logits, cache = _prefill_with(parts, KVCache.for_model(parts.cfg, 1, max_len, model.dtype),
                                      tokens, lengths, method)
        row_agree, row_kl = compare(ref_logits, _forced_logits(parts, cache, logits, generated))
        agree.extend(row_agree)
        kl.extend(row_kl)
    return {"top1_agreement": float(np.mean(agree)), "kl": float(np.mean(kl)), "num_tokens": len(agree)}, reference


def _padded(prompt, width):
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :len(prompt)] = prompt
    return tokens, np.array([len(prompt)], np.int32)


PLOTTED = (("ppl", "perplexity"), ("accuracy", "next-token accuracy"), ("top1_agreement", "top-1 agreement"),
           ("kl", "KL(full || compressed)"))


def plot(results: list[dict], path, *, x: str = "compression_ratio", x_label: str = "compression ratio",
         panels=PLOTTED, baseline: str = "none") -> None:
    """One panel per (metric, title) in `panels` against `x`, one line per method name (its spec
    without the ratio: "knorm:0.5+int8" -> "knorm+int8"); the `baseline` method is a dashed line."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise KVJaxError("the plot needs matplotlib: pip install 'kvjax[eval]' (or pass --no-plot)") from None
    lines: dict[str, list[dict]] = {}
    for row in results:
        name, _, rest = row["method"].partition(":")
        lines.setdefault(name + rest[rest.find("+"):] if "+" in rest else name, []).append(row)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), constrained_layout=True, squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        ax.set_prop_cycle(color=plt.cm.tab20.colors)  # up to 20 distinct lines (the fidelity suite has ~16)
        for name, rows in lines.items():
            if name == baseline:
                ax.axhline(rows[0][key], color="gray", linestyle="--", label=f"{baseline} (full cache)")
                continue
            rows = sorted(rows, key=lambda r: r[x])
            ax.plot([r[x] for r in rows], [r[key] for r in rows], marker="o", label=name)
        ax.set_title(title)
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)
