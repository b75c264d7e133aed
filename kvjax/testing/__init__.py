"""Tiny random-weight checkpoints in Hugging Face format, for tests, demos and benchmarks: they
load through the same loaders as real checkpoints, and nothing is downloaded."""

from kvjax.testing.text import DEMO_TEXT, build_tokenizer, ensure_demo_checkpoint, write_checkpoint
from kvjax.testing.vlm import VLM_PRESETS, ensure_demo_vlm, write_vlm_checkpoint

__all__ = ["DEMO_TEXT", "build_tokenizer", "ensure_demo_checkpoint", "write_checkpoint", "VLM_PRESETS",
           "ensure_demo_vlm", "write_vlm_checkpoint"]
