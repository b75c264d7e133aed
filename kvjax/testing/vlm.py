"""Random-weight VLM checkpoints (LLaVA-1.5, MiniCPM-V-2.6 shapes) in Hugging Face format, so the
image paths of chat, tests and benchmarks run offline through the real loaders.

Weights use the hub key layouts (LLaVA: `language_model.* / vision_tower.vision_model.* /
multi_modal_projector.*`; MiniCPM-V: `llm.* / vpm.* / resampler.*`). The tokenizer is the demo
byte-level BPE plus each model's image tokens; preprocessor_config.json carries the image
processor settings.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvjax.testing import text as demo
from kvjax.errors import KVJaxError

_TINY_CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  image_size=56, patch_size=14)
_CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14)
# A tiny NaViT SigLIP (5x5 position table); the so400m/14 tower of MiniCPM-V-2.6.
_TINY_SIGLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    image_size=70, patch_size=14)
_SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                      image_size=980, patch_size=14)
# MiniCPM-V fields beside the LM's: 2.6's, and a tiny one that still slices a small image.
_MINICPMV_26 = dict(query_num=64, slice_config={"max_slice_nums": 9, "patch_size": 14, "scale_resolution": 448})
_MINICPMV_TINY = dict(query_num=16, slice_config={"max_slice_nums": 9, "patch_size": 14, "scale_resolution": 56})
# name -> (family, vision fields, text fields[, MiniCPM-V fields])
VLM_PRESETS = {
    "llava": ("llava", _TINY_CLIP, dict(demo.ARCH_PRESETS["llama"], vocab_size=576)),
    "llava-1.5-7b": ("llava", _CLIP_L_336, dict(demo.LIKE_PRESETS["llama-2-7b"][1], vocab_size=32064)),
    # hidden 256: the resampler has hidden / 128 heads, so two here
    "minicpmv": ("minicpmv", _TINY_SIGLIP, dict(demo.ARCH_PRESETS["qwen2"], hidden_size=256,
                                                   intermediate_size=256, vocab_size=576), _MINICPMV_TINY),
    "minicpm-v-2.6": ("minicpmv", _SIGLIP_SO400M, dict(demo.LIKE_PRESETS["qwen2-7b"][1]), _MINICPMV_26),
}
LIKE = tuple(name for name in VLM_PRESETS if name not in ("llava", "minicpmv"))  # real shapes
LLAVA_TOKENS = ("<image>",)
# MiniCPM-V-2.6's image markers and ChatML turn tokens (its <unk> is the demo tokenizer's own).
MINICPMV_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "</image>", "<slice>", "</slice>",
                   "<image_id>", "</image_id>")
CHATML_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def clip_specs(cfg, prefix: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of a CLIPVisionModel's weights under `prefix`."""
    d, p = cfg.hidden_size, cfg.patch_size
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


def _minicpmv_files(vision_fields, text_fields, fields, dtype, seed, init_std, max_shard_bytes):
    """-> write_files(tmp) for a MiniCPM-V-2.6 checkpoint in its remote-code layout (config.json
    with auto_map, `llm.* / vpm.* / resampler.*` weights); kvjax never runs that code."""
    import transformers

    tok = demo.build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(MINICPMV_TOKENS)})
    tok.chat_template = CHATML_TEMPLATE
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    text = transformers.Qwen2Config(bos_token_id=tok.bos_token_id, eos_token_id=im_end,
                                    pad_token_id=tok.pad_token_id, **text_fields)
    if len(tok) > text.vocab_size:
        raise KVJaxError(f"vocab_size {text.vocab_size} is smaller than the demo tokenizer's {len(tok)} tokens")
    vision = transformers.SiglipVisionConfig(**vision_fields)
    config = {k: v for k, v in text.to_dict().items() if k not in ("architectures", "transformers_version")}
    config.update(architectures=["MiniCPMV"], model_type="minicpmv", version=2.6, dtype=dtype,
                  auto_map={"AutoConfig": "configuration_minicpm.MiniCPMVConfig",
                            "AutoModel": "modeling_minicpmv.MiniCPMV"},
                  image_size=fields["slice_config"]["scale_resolution"], patch_size=vision.patch_size,
                  use_image_id=True, slice_mode=True, batch_vision_input=True, drop_vision_last_layer=False,
                  vision_config=dict(vision_fields, model_type="siglip_vision_model"), **fields)
    h, d, q, p = text.hidden_size, vision.hidden_size, fields["query_num"], vision.patch_size
    vpm = [("vpm.embeddings.patch_embedding.weight", (d, 3, p, p), "weight"),
           ("vpm.embeddings.patch_embedding.bias", (d,), "bias"),
           ("vpm.embeddings.position_embedding.weight", ((vision.image_size // p) ** 2, d), "weight")]
    vpm += encoder_specs(vision, "vpm.") + [("vpm.post_layernorm.weight", (d,), "norm"),
                                             ("vpm.post_layernorm.bias", (d,), "bias")]
    resampler = [("resampler.query", (q, h), "weight"), ("resampler.kv_proj.weight", (h, d), "weight"),
                 ("resampler.attn.in_proj_weight", (3 * h, h), "weight"),
                 ("resampler.attn.in_proj_bias", (3 * h,), "bias"),
                 ("resampler.attn.out_proj.weight", (h, h), "weight"),
                 ("resampler.attn.out_proj.bias", (h,), "bias"), ("resampler.proj", (h, h), "weight")]
    for norm in ("ln_q", "ln_kv", "ln_post"):
        resampler += [(f"resampler.{norm}.weight", (h,), "norm"), (f"resampler.{norm}.bias", (h,), "bias")]
    specs = _with_prefix(demo._tensor_specs("qwen2", text), "llm.") + vpm + resampler

    def write_files(tmp: Path) -> None:
        tok.save_pretrained(tmp)
        demo._write_weights(tmp, specs, demo._DTYPES[dtype], seed, init_std, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        slicing = fields["slice_config"]
        settings = dict(image_processor_type="MiniCPMVImageProcessor", image_feature_size=q,
                        max_slice_nums=slicing["max_slice_nums"], scale_resolution=slicing["scale_resolution"],
                        patch_size=p, use_image_id=True, slice_mode=True, norm_mean=[0.5] * 3,
                        norm_std=[0.5] * 3, version=2.6)
        (tmp / "preprocessor_config.json").write_text(json.dumps(settings, indent=2) + "\n")

    return write_files


def write_vlm_checkpoint(out_dir, preset: str = "llava", *, dtype: str = "float32", seed: int = 0,
                         init_std: float = 0.02, max_shard_bytes: int = 2 * 1024**3,
                         overwrite: bool = False) -> Path:
    """Write a random-weight VLM checkpoint of `preset` (see VLM_PRESETS) to `out_dir`."""
    demo._choose("VLM preset", preset, VLM_PRESETS)
    demo._choose("dtype", dtype, demo._DTYPES)
    family, vision_fields, text_fields, *extra = VLM_PRESETS[preset]
    if family == "llava":
        write_files = _llava_files(vision_fields, text_fields, dtype, seed, init_std, max_shard_bytes)
    else:
        write_files = _minicpmv_files(vision_fields, text_fields, extra[0], dtype, seed, init_std,
                                      max_shard_bytes)
    return demo.write_atomically(out_dir, write_files, overwrite=overwrite)


def ensure_demo_vlm(preset: str = "llava") -> Path:
    """Write the tiny demo VLM `preset` once under $KVJAX_HOME (or ~/.cache/kvjax) and return it."""
    path = demo.kvjax_home() / f"demo-{preset}"
    if (path / "config.json").exists():
        return path
    try:
        write_vlm_checkpoint(path, preset)
    except (OSError, KVJaxError):  # another process put its copy there first
        if not (path / "config.json").exists():
            raise
    return path
