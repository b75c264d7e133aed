"""What every suite compares, in one order: the full cache, CCM at each compressor's factor, then
every ratio press at the KV bytes each CCM row measured and at 50 %, int8 alone, after the
strongest CCM and after INT8_PRESSES at 50 %, then the suite's own extra rows."""

from __future__ import annotations

import dataclasses
from typing import Callable

from kvjax import evaluation
from kvjax.compression import Int8KV, presses
from kvjax.evaluation import FULL_CACHE, Method

NOT_SWEPT = ("l2_compress", "streaming_llm", "fix_size_l2")  # fixed-size methods, not at a ratio
INT8_PRESSES = ("knorm", "snapkv")  # press+int8 rows, at 50 %


def ratio_presses(names=()) -> list[str]:
    """The presses swept at a ratio: `names` (checked), or every registered one but NOT_SWEPT."""
    swept = [name for name in presses.list_presses() if name not in NOT_SWEPT]
    if unknown := set(names) - set(swept):
        raise ValueError(f"not ratio presses: {sorted(unknown)}; choose from {swept}")
    return list(names) or swept


def press_methods(ratios, names=()) -> list[Method]:
    """Each ratio press (`names`, default all) at each compression ratio (fraction of the context's
    tokens dropped)."""
    return [m for m in evaluation.parse_methods([f"{name}:{','.join(f'{r:.3f}' for r in ratios)}"
                                                 for name in ratio_presses(names)]) if m.family != "none"]


def ccm_methods(compressors) -> list[Method]:
    return [Method(f"ccm:{c.cfg.compression_factor}", "ccm", 1 - 1 / c.cfg.compression_factor, c)
            for c in sorted(compressors, key=lambda c: c.cfg.compression_factor)]


def with_int8(method: Method) -> Method:
    return dataclasses.replace(method, label=method.label + "+int8", method=(method.method, Int8KV()),
                               is_quantized=True)


def compared_methods(ccm: list[Method], matched: list[float], press_names=()) -> list[Method]:
    """What is set against CCM: each ratio press (press_names, default all) at each CCM row's
    measured ratio (fraction of the bytes dropped) and at 50 %, int8 alone, after the strongest CCM
    and after those of INT8_PRESSES at 50 %."""
    out = press_methods(sorted(set(matched) | {0.5}), press_names)
    out += [Method("int8", "int8", 0.0, Int8KV())] + [with_int8(m) for m in ccm[-1:]]
    return out + [with_int8(m) for m in press_methods([0.5], press_names)
                  if m.label.partition(":")[0] in INT8_PRESSES]


def sweep(name: str, score: Callable[[Method], dict], compressors=(), extra: list[Method] = (), *,
          press_names=(), summary: Callable[[dict], str] = lambda row: "", progress: bool = True) -> list[dict]:
    """Rows of `score(method)` (a dict with at least "kv_bytes") over the methods above (the presses:
    press_names, default all), each with its "method" label ("full" for the full cache) first and
    its kv_bytes_ratio to the full row's."""
    from tqdm import tqdm

    bar = tqdm(desc=name, unit="method", disable=not progress)
    rows = []

    def measure(method: Method) -> dict:
        label = "full" if method.family == "none" else method.label
        row = {"method": label, **score(method)}
        row["kv_bytes_ratio"] = row["kv_bytes"] / (rows[0]["kv_bytes"] if rows else row["kv_bytes"])
        rows.append(row)
        bar.update()
        bar.set_postfix_str(f"{label}: {summary(row)}")
        return row

    measure(FULL_CACHE)
    ccm = ccm_methods(compressors)
    matched = [round(1 - measure(m)["kv_bytes_ratio"], 3) for m in ccm]
    later = compared_methods(ccm, matched, press_names) + list(extra)
    bar.total = 1 + len(ccm) + len(later)
    for method in later:
        measure(method)
    bar.close()
    return rows
