"""LLaVA-1.5 in kvjax equals transformers' LlavaForConditionalGeneration (tiny random config),
loaded from every checkpoint key layout; image_len and batching of (image, question) pairs."""

import json
import pathlib

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import kvjax
from kvjax.vision.prompt import embed_prompt, image_prefix_len, pack

IMAGE_TOKEN = 120
NUM_IMAGE_TOKENS = 9  # (42 / 14)^2, CLS dropped


def write_tiny_llava(path, seed=0):
    import transformers

    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=2, image_size=42, patch_size=14,
                                           projection_dim=16)
    text = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                    initializer_range=0.1, bos_token_id=1, eos_token_id=2)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                                      image_seq_length=NUM_IMAGE_TOKENS, pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    return model


def relayout(path, layout, torch_model):
    """Rewrite model.safetensors under another key layout."""
    if layout == "transformers5":  # the in-memory names of transformers 5
        tensors = {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}
    else:
        tensors = load_file(path / "model.safetensors")  # save_pretrained's (older) layout
        if layout == "hub":  # llava-hf/llava-1.5-7b-hf names its CLIP weights vision_tower.vision_model.*
            tensors = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in tensors.items()}
    assert any(k.startswith({"hub": "vision_tower.vision_model.", "saved": "vision_tower.embeddings",
                             "transformers5": "model.vision_tower."}[layout]) for k in tensors)
    (path / "model.safetensors").unlink()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    torch_model = write_tiny_llava(root / "saved")
    return root, torch_model


def make_rows(seed=0):
    """Two prompts with text before and after the image, different lengths."""
    rng = np.random.default_rng(seed)
    rows = []
    for before, after in ((3, 6), (5, 2)):
        rows.append([1, *rng.integers(3, 110, before - 1)] + [IMAGE_TOKEN] * NUM_IMAGE_TOKENS
                    + list(rng.integers(3, 110, after)))
    pixels = rng.standard_normal((2, 3, 42, 42)).astype(np.float32)
    return rows, pixels


@pytest.mark.parametrize("layout", ["hub", "saved", "transformers5"])
def test_llava_matches_transformers(llava, layout, tmp_path):
    import shutil

    root, torch_model = llava
    path = shutil.copytree(root / "saved", tmp_path / layout)
    relayout(path, layout, torch_model)
    model, _, cfg = kvjax.load(path, dtype="float32", tokenizer=False)
    assert cfg.num_image_tokens == NUM_IMAGE_TOKENS and cfg.text.family == "llama"
    rows, pixels = make_rows()
    tokens, lengths, mask = pack(rows, [[i == IMAGE_TOKEN for i in r] for r in rows], pad_id=0, length=32)
    embeds = embed_prompt(model, tokens, mask, pixels)
    lm = model.language_model
    cache = kvjax.KVCache.for_model(cfg.text, batch=2, max_len=64)
    logits, _ = kvjax.prefill(lm, cache, tokens, lengths, embeds=embeds, all_logits=True)
    out = kvjax.generate(lm, kvjax.KVCache.for_model(cfg.text, 2, 64), tokens, lengths, embeds=embeds,
                         max_new_tokens=16, eos_ids=())
    for b, row in enumerate(rows):
        ids, px = torch.tensor([row]), torch.from_numpy(pixels[b:b + 1])
        with torch.no_grad():
            expected = torch_model(input_ids=ids, pixel_values=px).logits[0].numpy()
            greedy = torch_model.generate(input_ids=ids, pixel_values=px, max_new_tokens=16, do_sample=False,
                                          eos_token_id=None, pad_token_id=0)[0, len(row):].numpy()
        diff = np.abs(np.asarray(logits)[b, :len(row)] - expected).max()
        assert diff <= 1e-4, diff
        np.testing.assert_array_equal(out.tokens[b], greedy)


def test_image_len_counts_text_before_the_image():
    rows, _ = make_rows()
    rows.append([1, 5, 6])  # text only
    _, _, mask = pack(rows, [[i == IMAGE_TOKEN for i in r] for r in rows], pad_id=0)
    # row 0: 3 text tokens, 9 image positions, 6 text -> prefix 12; row 1: 5 + 9 = 14
    np.testing.assert_array_equal(image_prefix_len(mask), [12, 14, 0])


def test_loader_reports_missing_tensor(llava, tmp_path):
    import shutil

    root, _ = llava
    path = shutil.copytree(root / "saved", tmp_path / "broken")
    tensors = load_file(path / "model.safetensors")
    del tensors["multi_modal_projector.linear_1.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(kvjax.CheckpointError, match="multi_modal_projector.linear_1.weight"):
        kvjax.load(path, dtype="float32", tokenizer=False)
    config = json.loads((path / "config.json").read_text())
    config["vision_feature_select_strategy"] = "middle"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(kvjax.KVJaxError, match="select_strategy"):
        kvjax.load(path, dtype="float32", tokenizer=False)


def test_demo_checkpoint_matches_transformers_and_batches_pairs(tmp_path):
    """The `--demo llava` checkpoint loads in transformers too; a batch of (image, question)
    pairs of different lengths in one prefill equals each pair alone."""
    import transformers

    from kvjax.testing.vlm import write_vlm_checkpoint
    from kvjax.vision import prompter_for

    path = write_vlm_checkpoint(tmp_path / "demo", "llava", init_std=0.1)
    model, tok, cfg = kvjax.load(path, dtype="float32")
    prompter = prompter_for(model, tok, cfg, path)
    pixels = prompter.pixels(pathlib.Path(__file__).parents[2] / "assets" / "sample.png")[None]
    noise = np.random.default_rng(0).standard_normal(pixels.shape[1:]).astype(np.float32)
    questions = ["What is in the picture?", "Describe the boat, the sea and the lighthouse in detail."]
    batch = prompter.build(questions, [pixels[0], noise])
    ids = tok("USER: <image>\nWhat is in the picture? ASSISTANT:")["input_ids"]
    start = ids.index(cfg.image_token_id)
    np.testing.assert_array_equal(batch.image_len, [start + cfg.num_image_tokens] * 2)
    np.testing.assert_array_equal(batch.tokens[0, :start], ids[:start])  # BOS + "USER: " before the image
    lm = model.language_model
    logits, _ = kvjax.prefill(lm, kvjax.KVCache.for_model(cfg.text, 2, 128), batch.tokens, batch.lengths,
                              embeds=batch.embeds)
    torch_model = transformers.LlavaForConditionalGeneration.from_pretrained(path).eval()
    for b, px in enumerate([pixels[0], noise]):
        one = prompter.build(questions[b:b + 1], [px])
        alone, _ = kvjax.prefill(lm, kvjax.KVCache.for_model(cfg.text, 1, 128), one.tokens, one.lengths,
                                 embeds=one.embeds)
        np.testing.assert_allclose(np.asarray(logits)[b], np.asarray(alone)[0], atol=1e-5, rtol=0)
        n = int(one.lengths[0])
        with torch.no_grad():
            expected = torch_model(input_ids=torch.tensor(one.tokens[:, :n], dtype=torch.long),
                                   pixel_values=torch.from_numpy(px[None])).logits[0, -1].numpy()
        np.testing.assert_allclose(np.asarray(alone)[0], expected, atol=1e-4, rtol=0)
