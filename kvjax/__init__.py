"""kvjax: KV-cache compression for LLM and VLM serving in JAX.

Notebook API::

    model, tokenizer, cfg = kvjax.load("path/to/hf_model", dtype="bfloat16")
    cache = kvjax.KVCache.for_model(cfg, batch=1, max_len=512, dtype=jnp.bfloat16)
    logits, cache = kvjax.prefill(model, cache, tokens, lengths)
    cache = kvjax.compress(cache, compressor, image_len)   # optional CCM: kv_len shrinks
    logits, cache = kvjax.decode_step(model, cache, next_tokens)
"""

from kvjax.cache import KVCache
from kvjax.compressors import (CompressorConfig, HybridCompressor, LinearDecoupleCompressor, apply_compression,
                               build_compressor, compress)
from kvjax.config import ModelConfig, RopeConfig
from kvjax.errors import CheckpointError, KVJaxError
from kvjax.loading import load
from kvjax.sampling import GREEDY, Sampling
from kvjax.steps import Generation, SplitModel, decode_step, generate, generate_from, prefill, split, stream

__all__ = [
    "KVCache", "ModelConfig", "RopeConfig", "CheckpointError", "KVJaxError", "load", "GREEDY",
    "Sampling", "Generation", "SplitModel", "decode_step", "generate", "generate_from", "prefill", "split",
    "stream", "CompressorConfig", "HybridCompressor", "LinearDecoupleCompressor", "apply_compression",
    "build_compressor", "compress",
]
