"""Shared pieces of kvjax's command lines: an ArgumentParser whose errors are one `error: ...`
line and exit 2 (like every other user error), integer argparse types with clear messages, press
options (NAME=VALUE) and the CCM compressor the flags name."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from kvjax.errors import KVJaxError


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other user error
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def int_at_least(low: int):
    """argparse type: an integer >= low, with a message that says so."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    return parse


positive_int, non_negative_int = int_at_least(1), int_at_least(0)


def run_cli(body: Callable[[], int]) -> int:
    """Run a command's body: a KVJaxError becomes one `error: ...` line and exit code 2, Ctrl-C 130."""
    # transformers advises installing PyTorch when it is absent; kvjax runs on JAX alone.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        return body()
    except KVJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def parse_options(pairs) -> dict:
    """['window_size=8', 'use_vnorm=false'] -> {'window_size': 8, 'use_vnorm': False} (CLI press options)."""
    options = {}
    for pair in pairs or ():
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise KVJaxError(f"press option {pair!r} must look like NAME=VALUE, e.g. window_size=16")
        lowered = text.strip().lower()
        if lowered in ("true", "false"):
            options[key] = lowered == "true"
            continue
        for kind in (int, float):
            try:
                options[key] = kind(text)
                break
            except ValueError:
                options[key] = text
    return options


def model_dir_from_flags(model_dir, demo, image=None):
    """--model-dir, or --demo's built-in random checkpoint (written offline on first use), or a
    shipped model: the default VLM when there is an --image, else the default text model."""
    from kvjax import defaults, testing

    if model_dir is not None and demo:
        raise KVJaxError("pass either --model-dir or --demo, not both")
    if demo:
        return testing.ensure_demo_vlm(demo) if demo in ("llava", "minicpmv") else testing.ensure_demo_checkpoint()
    if model_dir is not None:
        return model_dir
    return defaults.default_vlm_dir() if image is not None else defaults.default_model_dir()


def ccm_from_flags(model_cfg, ckpt, compression_factor, min_seq_len, dtype: str, model_dir=None, keep_last=None):
    """--kv-compress-ckpt loaded (checked against the model, cast to dtype), or without one an
    untrained decoupled compressor of the model's shape."""
    from kvjax.compression.ccm import CompressorConfig, build_compressor
    from kvjax.compression.checkpoint import load_compressor

    if ckpt is not None:
        return load_compressor(ckpt, model_cfg, dtype=dtype, compression_factor=compression_factor,
                               min_seq_len=min_seq_len, keep_last=keep_last, model_dir=model_dir)
    return build_compressor(CompressorConfig.for_model(model_cfg, compression_factor=compression_factor,
                                                       min_seq_len=min_seq_len, keep_last=keep_last, dtype=dtype))


def add_parallel_flags(parser, *, hosts: bool = True) -> None:
    """--tensor-parallel N, and (hosts=True) the jax.distributed flags for a run that spans hosts."""
    g = parser.add_argument_group("devices (kvjax.parallel)")
    g.add_argument("--tensor-parallel", type=positive_int, metavar="N",
                   help="split the model's layers and the KV cache (over KV heads) across N devices")
    if hosts:
        g.add_argument("--coordinator", metavar="HOST:PORT",
                       help="several hosts: process 0's address (jax.distributed; or $KVJAX_COORDINATOR); every "
                            "process runs the same command with its own --process-id")
        g.add_argument("--num-processes", type=positive_int, help="several hosts: how many processes in all")
        g.add_argument("--process-id", type=non_negative_int, help="several hosts: this process's index")


def setup_parallel(args) -> int | None:
    """Join the multi-host run the flags describe (before anything touches a device); returns the
    tensor-parallel size to load with (None: one device)."""
    from kvjax import parallel

    spans_hosts = any(getattr(args, name, None) is not None for name in ("coordinator", "num_processes",
                                                                         "process_id"))
    if spans_hosts or os.environ.get("KVJAX_COORDINATOR"):
        parallel.initialize_distributed(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                                        getattr(args, "process_id", None))
    return args.tensor_parallel
