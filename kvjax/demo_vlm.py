"""Random-weight VLM checkpoints (LLaVA-1.5, MiniCPM-V-2.6 shapes) in Hugging Face format, so the
image paths of chat, tests and benchmarks run offline through the real loaders.

Weights use the hub key layouts (LLaVA: `language_model.* / vision_tower.vision_model.* /
multi_modal_projector.*`; MiniCPM-V: `llm.* / vpm.* / resampler.*`). The tokenizer is the demo
byte-level BPE plus each model's image tokens; preprocessor_config.json carries the image
processor settings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvjax import demo
from kvjax.errors import KVJaxError

_TINY_CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  image_size=56, patch_size=14)
_CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14)
# name -> (family, vision fields, text fields)
VLM_PRESETS = {
    "llava": ("llava", _TINY_CLIP, dict(demo.ARCH_PRESETS["llama"], vocab_size=576)),
    "llava-1.5-7b": ("llava", _CLIP_L_336, dict(demo.LIKE_PRESETS["llama-2-7b"][1], vocab_size=32064)),
}
LIKE = tuple(name for name in VLM_PRESETS if name not in ("llava", "minicpmv"))  # real shapes
LLAVA_TOKENS = ("<image>",)


def clip_specs(cfg, prefix: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of a CLIPVisionModel's weights under `prefix`."""
    d, inner, p = cfg.hidden_size, cfg.intermediate_size, cfg.patch_size
    specs = [(prefix + "embeddings.class_embedding", (d,), "weight"),
             (prefix + "embeddings.patch_embedding.weight", (d, cfg.num_channels, p, p), "weight"),
             (prefix + "embeddings.position_embedding.weight", ((cfg.image_size // p) ** 2 + 1, d), "weight"),
             (prefix + "pre_layrnorm.weight", (d,), "norm"), (prefix + "pre_layrnorm.bias", (d,), "bias")]
    return specs + encoder_specs(cfg, prefix) + [(prefix + "post_layernorm.weight", (d,), "norm"),
                                                 (prefix + "post_layernorm.bias", (d,), "bias")]


def encoder_specs(cfg, prefix: str) -> list[tuple[str, tuple[int, ...], str]]:
    d, inner = cfg.hidden_size, cfg.intermediate_size
    specs = []
    for i in range(cfg.num_hidden_layers):
        p = f"{prefix}encoder.layers.{i}."
        for name in ("q", "k", "v", "out"):
            specs += [(f"{p}self_attn.{name}_proj.weight", (d, d), "weight"),
                      (f"{p}self_attn.{name}_proj.bias", (d,), "bias")]
        for norm in ("layer_norm1", "layer_norm2"):
            specs += [(f"{p}{norm}.weight", (d,), "norm"), (f"{p}{norm}.bias", (d,), "bias")]
        specs += [(f"{p}mlp.fc1.weight", (inner, d), "weight"), (f"{p}mlp.fc1.bias", (inner,), "bias"),
                  (f"{p}mlp.fc2.weight", (d, inner), "weight"), (f"{p}mlp.fc2.bias", (d,), "bias")]
    return specs


def _with_prefix(specs, prefix: str):
    return [(prefix + name, shape, kind) for name, shape, kind in specs]


def _llava_files(vision_fields, text_fields, dtype, seed, init_std, max_shard_bytes):
    """-> write_files(tmp) for a LLaVA-1.5 checkpoint in the hub layout."""
    import transformers

    tok = demo.build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(LLAVA_TOKENS)})
    image_token = tok.convert_tokens_to_ids("<image>")
    text = transformers.LlamaConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id, **text_fields)
    if len(tok) > text.vocab_size:
        raise KVJaxError(f"vocab_size {text.vocab_size} is smaller than the demo tokenizer's {len(tok)} tokens")
    vision = transformers.CLIPVisionConfig(projection_dim=text.hidden_size, **vision_fields)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                                   pad_token_id=tok.pad_token_id, dtype=dtype,
                                   image_seq_length=(vision.image_size // vision.patch_size) ** 2)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    h, v = text.hidden_size, vision.hidden_size
    specs = (_with_prefix(demo._tensor_specs("llama", text), "language_model.")
             + clip_specs(vision, "vision_tower.vision_model.")
             + [("multi_modal_projector.linear_1.weight", (h, v), "weight"),
                ("multi_modal_projector.linear_1.bias", (h,), "bias"),
                ("multi_modal_projector.linear_2.weight", (h, h), "weight"),
                ("multi_modal_projector.linear_2.bias", (h,), "bias")])

    def write_files(tmp: Path) -> None:
        tok.save_pretrained(tmp)
        demo._write_weights(tmp, specs, demo._DTYPES[dtype], seed, init_std, max_shard_bytes)
        cfg.save_pretrained(tmp)
        size = vision.image_size
        # Written as JSON (CLIPImageProcessor's defaults) so no image backend is needed here.
        settings = dict(image_processor_type="CLIPImageProcessor", do_resize=True,
                        size={"shortest_edge": size}, resample=3, do_center_crop=True,
                        crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255,
                        do_normalize=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
                        image_std=[0.26862954, 0.26130258, 0.27577711], do_convert_rgb=True)
        (tmp / "preprocessor_config.json").write_text(json.dumps(settings, indent=2) + "\n")

    return write_files


def write_vlm_checkpoint(out_dir, preset: str = "llava", *, dtype: str = "float32", seed: int = 0,
                         init_std: float = 0.02, max_shard_bytes: int = 2 * 1024**3,
                         overwrite: bool = False) -> Path:
    """Write a random-weight VLM checkpoint of `preset` (see VLM_PRESETS) to `out_dir`."""
    demo._choose("VLM preset", preset, VLM_PRESETS)
    demo._choose("dtype", dtype, demo._DTYPES)
    family, vision_fields, text_fields = VLM_PRESETS[preset]
    if family == "llava":
        write_files = _llava_files(vision_fields, text_fields, dtype, seed, init_std, max_shard_bytes)
    else:
        from kvjax.demo_minicpmv import minicpmv_files

        write_files = minicpmv_files(vision_fields, text_fields, dtype, seed, init_std, max_shard_bytes)
    return demo.write_atomically(out_dir, write_files, overwrite=overwrite)


def ensure_demo_vlm(preset: str = "llava") -> Path:
    """Write the tiny demo VLM `preset` once under $KVJAX_HOME (or ~/.cache/kvjax) and return it."""
    home = os.environ.get("KVJAX_HOME") or Path.home() / ".cache" / "kvjax"
    path = Path(home).expanduser() / f"demo-{preset}"
    if (path / "config.json").exists():
        return path
    try:
        write_vlm_checkpoint(path, preset)
    except (OSError, KVJaxError):  # another process put its copy there first
        if not (path / "config.json").exists():
            raise
    return path
