"""`python -m kvjax.serve`: an OpenAI-compatible HTTP server over kvjax's paged engine (default
model: the shipped default model).

    python -m kvjax.serve --port 8000 --kv-compress          # the shipped model, CCM cf5 by default
    curl localhost:8000/v1/chat/completions -d '{"model": "kvjax-default", "messages": [...]}'

Requests may choose their own compression in the body (`kv_compression`, see README "Serve").
Bad flags and checkpoints print one `error: ...` line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys

from kvjax.cli.common import Parser, add_parallel_flags, model_dir_from_flags, non_negative_int, parse_options, positive_int, run_cli
from kvjax.errors import KVJaxError

DEFAULT_MAX_MODEL_LEN = 2048


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m kvjax.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", help="Hugging Face model directory (default: the shipped default model)")
    p.add_argument("--demo", choices=["llama", "llava", "minicpmv"],
                   help="serve a built-in tiny random-weight model of this family (tests, trying the API)")
    p.add_argument("--served-model-name", help="the model id clients send (default: kvjax-default for the "
                                               "shipped model, else the directory's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=non_negative_int, default=8000)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0, help="derives the sampling seed of requests that send none")
    p.add_argument("--drain-s", type=float, default=30.0,
                   help="on shutdown (Ctrl-C / SIGTERM), let in-flight requests finish for this long, then abort them")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g = p.add_argument_group("engine sizing")
    g.add_argument("--max-model-len", type=positive_int,
                   help=f"slots one sequence may hold (default: the model's context, at most {DEFAULT_MAX_MODEL_LEN})")
    g.add_argument("--page-size", type=positive_int, default=16)
    g.add_argument("--kv-cache-bytes", type=positive_int, help="page pool size in bytes (default: --max-num-seqs "
                                                               "full sequences)")
    g.add_argument("--max-num-seqs", type=positive_int, default=16)
    g.add_argument("--prefill-batch-size", type=positive_int, default=4)
    g.add_argument("--compress-batch-size", type=positive_int, help="rows of a prefill batch that compress "
                                                                    "(default: --prefill-batch-size)")
    g.add_argument("--decoding-batch-size", type=positive_int, default=16)
    g = p.add_argument_group("default compression (a request's kv_compression overrides it)")
    g.add_argument("--kv-compress", action="store_true", help="compress prompts with CCM by default")
    g.add_argument("--kv-compress-ckpt", help="CCM compressor checkpoint directory; the shipped default model "
                                              "brings its own (cf 2, 3, 5), so requests can ask for ccm there")
    g.add_argument("--kv-compress-factor", type=positive_int, help="the default ccm factor (default 5)")
    g.add_argument("--press", help="press prompts with this method by default, e.g. snapkv")
    g.add_argument("--compression-ratio", type=float, help="the default --press ratio (default 0.5)")
    g.add_argument("--press-option", action="append", metavar="NAME=VALUE", help="press hyper-parameter, repeatable")
    g.add_argument("--kv-quantize", choices=["none", "int8"], default="none",
                   help="keep every request's KV pages int8 (about 3.6x the pages of float32 per byte)")
    add_parallel_flags(p, hosts=False)  # one host: the HTTP front end and the engine loop live in one process
    return p


def load_service(args):
    """Flags -> a loaded model behind a live engine (`inference.server.Service`)."""
    try:
        from inference.openai_api import KVCompression
        from inference.server import Service
    except ImportError as e:
        raise KVJaxError(f"serving needs its extra ({e.name} is missing): pip install 'kvjax[serve]'") from None
    import kvjax
    from kvjax import defaults
    from kvjax.compression.checkpoint import load_compressor

    if args.press is not None and (args.kv_compress or args.kv_compress_factor):
        raise KVJaxError("pass either --press or --kv-compress, not both")
    if args.press is None and (args.compression_ratio is not None or args.press_option):
        raise KVJaxError("--compression-ratio / --press-option set a press: add --press NAME or drop them")
    model_dir = model_dir_from_flags(args.model_dir, args.demo)
    is_default = defaults.is_default_model(model_dir)
    logging.getLogger("kvjax.serve").info("loading %s", model_dir)
    model, tokenizer, cfg = kvjax.load(model_dir, dtype=args.dtype, tensor_parallel=args.tensor_parallel)
    text_cfg = getattr(cfg, "text", cfg)
    import jax.numpy as jnp

    dtype = jnp.dtype(model.dtype).name
    paths = [args.kv_compress_ckpt] if args.kv_compress_ckpt else \
        [defaults.default_compressor_dir(f, model_dir) for f in defaults.shipped_factors(model_dir)] if is_default else []
    compressors = {}
    for path in paths:
        compressor = load_compressor(path, text_cfg, dtype=dtype, model_dir=model_dir)
        compressors[compressor.cfg.compression_factor] = compressor
    if args.kv_compress and not compressors:
        raise KVJaxError("--kv-compress needs a trained compressor for this model: pass --kv-compress-ckpt DIR "
                         "(a server never compresses with an untrained one)")
    if args.press is not None:
        default = KVCompression(method=args.press, ratio=args.compression_ratio,
                                options=parse_options(args.press_option))
    elif args.kv_compress or args.kv_compress_factor:
        default = KVCompression(method="ccm", compression_factor=args.kv_compress_factor)
    else:
        default = KVCompression()
    name = args.served_model_name or ("kvjax-default" if is_default else pathlib.Path(model_dir).name)
    max_model_len = args.max_model_len or min(text_cfg.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
    from inference.openai_api import APIError

    try:
        return Service(model, tokenizer, cfg, name=name, model_dir=model_dir, compressors=compressors,
                       default_compression=default, kv_quantize=args.kv_quantize, drain_s=args.drain_s,
                       seed=args.seed, page_size=args.page_size, kv_cache_bytes=args.kv_cache_bytes,
                       max_num_seqs=args.max_num_seqs, max_model_len=max_model_len,
                       prefill_batch_size=args.prefill_batch_size, compress_batch_size=args.compress_batch_size,
                       decoding_batch_size=args.decoding_batch_size)
    except APIError as e:  # the default compression the flags name is not servable
        raise KVJaxError(e.message) from None


def run(args) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    service = load_service(args)
    from inference.server import build_app, uvicorn_server

    print(f"kvjax serve: {service.name} on http://{args.host}:{args.port}/v1 (default compression: "
          f"{service.resolve(service.default_compression)[1]}; CCM factors: "
          f"{sorted(service.compressors) or 'none'})", file=sys.stderr)
    try:
        uvicorn_server(service, build_app(service), args.host, args.port, args.log_level).run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on: the drain is done by now
        pass
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
