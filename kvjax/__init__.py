"""kvjax: KV-cache compression for LLM and VLM serving in JAX.

Notebook API::

    model, tokenizer, cfg = kvjax.load("path/to/hf_model", dtype="bfloat16")
    cache = kvjax.KVCache.for_model(cfg, batch=1, max_len=512, dtype=jnp.bfloat16)
    logits, cache = kvjax.prefill(model, cache, tokens, lengths)
    cache = kvjax.compress(cache, method, image_len)       # CCM, a press, Int8KV() or a tuple: kv_len shrinks
    logits, cache = kvjax.decode_step(model, cache, next_tokens)

    # one prefill that records what a query press (SnapKV, TOVA, ...) reads, then compress:
    logits, cache = kvjax.prefill_and_compress(model, cache, tokens, lengths, method=press)
"""

from kvjax.cache import KVCache
from kvjax.compression import Int8KV, compress, prefill_and_compress, presses
from kvjax.compression.ccm import (CCMCompressor, CompressorConfig, HybridCompressor, LinearDecoupleCompressor,
                                   apply_compression, build_compressor)
from kvjax.compression.checkpoint import load_compressor, save_compressor
from kvjax.config import ModelConfig, RopeConfig
from kvjax.errors import CheckpointError, KVJaxError
from kvjax.loading import load
from kvjax.sampling import GREEDY, Sampling
from kvjax.steps import (Generation, SplitModel, decode_step, generate, generate_from, prefill, split, stream,
                         stream_from)

__all__ = [
    "KVCache", "ModelConfig", "RopeConfig", "CheckpointError", "KVJaxError", "load", "GREEDY",
    "Sampling", "Generation", "SplitModel", "decode_step", "generate", "generate_from", "prefill", "split",
    "stream", "stream_from", "compress", "prefill_and_compress", "presses", "Int8KV", "CCMCompressor",
    "CompressorConfig", "HybridCompressor", "LinearDecoupleCompressor", "apply_compression", "build_compressor",
    "load_compressor", "save_compressor",
]
