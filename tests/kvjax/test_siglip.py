"""SigLIP tower equals transformers' SiglipVisionModel; NaViT position ids equal the remote code's
float32 torch bucketing exactly; padded batches of different-size images equal each image alone."""

import numpy as np
import pytest
import torch
from flax import nnx

from kvjax.loading import fill_module
from kvjax.models.siglip import SiglipVisionTower, batch_strips, navit_position_ids, patch_strip
from kvjax.models.vit import VisionConfig


def torch_position_ids(nb_h, nb_w, grid):
    """modeling_navit_siglip's bucketing as the remote code runs it: int32 tgt_sizes, so 1 / nb is
    float32, and torch's own float32 CPU arange."""
    tgt_sizes = torch.tensor([[nb_h, nb_w]], dtype=torch.int32)
    boundaries = torch.arange(1 / grid, 1.0, 1 / grid)
    nb_patches_h, nb_patches_w = tgt_sizes[0][0], tgt_sizes[0][1]
    fractional_coords_h = torch.arange(0, 1 - 1e-6, 1 / nb_patches_h)
    fractional_coords_w = torch.arange(0, 1 - 1e-6, 1 / nb_patches_w)
    bucket_coords_h = torch.bucketize(fractional_coords_h, boundaries, right=True)
    bucket_coords_w = torch.bucketize(fractional_coords_w, boundaries, right=True)
    return (bucket_coords_h[:, None] * grid + bucket_coords_w).flatten().numpy()


@pytest.mark.parametrize("grid", [70, 4])
def test_navit_position_ids_equal_the_remote_code_for_every_grid(grid):
    """Every (h, w) patch grid up to 70x70, no tolerance: the model was trained on these ids."""
    for nb_h in range(1, 71):
        for nb_w in range(1, 71):
            np.testing.assert_array_equal(navit_position_ids(nb_h, nb_w, grid), torch_position_ids(nb_h, nb_w, grid),
                                          err_msg=f"{nb_h}x{nb_w} patches, grid {grid}")
    np.testing.assert_array_equal(navit_position_ids(grid, grid, grid), np.arange(grid * grid))


def test_navit_buckets_equal_the_remote_code_up_to_100():
    """One side at a time (ids = row bucket * grid), every patch count and grid size up to 100."""
    for grid in range(1, 101):
        for nb in range(1, 101):
            np.testing.assert_array_equal(navit_position_ids(nb, 1, grid), torch_position_ids(nb, 1, grid),
                                          err_msg=f"{nb} patches, grid {grid}")


def test_navit_position_ids_known_float32_case():
    """25 patches on the 70 grid: the float32 arange puts rows 5, 10, 15, 20 one bucket lower
    than exact arithmetic (floor(k * 70 / 25) = 14, 28, 42, 56)."""
    rows = navit_position_ids(25, 1, 70) // 70
    assert rows[[5, 10, 15, 20]].tolist() == [13, 27, 41, 55]


@pytest.fixture(scope="module")
def siglip():
    import transformers

    hf_cfg = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=42, patch_size=14,
                                             vision_use_head=False)
    torch.manual_seed(0)
    torch_model = transformers.SiglipVisionModel(hf_cfg).eval()
    cfg = VisionConfig.from_hf_config(hf_cfg)
    assert cfg.hidden_act == "gelu_pytorch_tanh" and cfg.layer_norm_eps == 1e-6
    abstract = nnx.eval_shape(lambda: SiglipVisionTower(cfg, rngs=nnx.Rngs(0)))
    tensors = [(k.removeprefix("vision_model."), v.numpy()) for k, v in torch_model.state_dict().items()]
    return torch_model, cfg, fill_module(abstract, tensors, dtype=np.float32)


def test_square_image_matches_siglip_vision_model(siglip):
    torch_model, cfg, tower = siglip
    image = np.random.default_rng(0).standard_normal((2, 3, 42, 42)).astype(np.float32)
    strips = [patch_strip(x, 14) for x in image]
    pixels, position_ids, mask = batch_strips(strips, [(3, 3)] * 2, cfg)
    out = np.asarray(tower(pixels, position_ids, mask))
    with torch.no_grad():
        expected = torch_model(pixel_values=torch.from_numpy(image)).last_hidden_state.numpy()
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def test_non_square_images_in_a_padded_batch(siglip):
    """A 2x1 and a 1x3 patch image: positions bucketed, padding masked; reference = transformers'
    own embedding, encoder and post_layernorm modules fed the same position ids one image at a time."""
    torch_model, cfg, tower = siglip
    rng = np.random.default_rng(1)
    images = [rng.standard_normal((3, 28, 14)).astype(np.float32), rng.standard_normal((3, 14, 42)).astype(np.float32)]
    sizes = [(2, 1), (1, 3)]
    pixels, position_ids, mask = batch_strips([patch_strip(x, 14) for x in images], sizes, cfg)
    out = np.asarray(tower(pixels, position_ids, mask))
    for i, (image, (h, w)) in enumerate(zip(images, sizes)):
        with torch.no_grad():
            emb = torch_model.embeddings.patch_embedding(torch.from_numpy(image[None])).flatten(2).transpose(1, 2)
            emb = emb + torch_model.embeddings.position_embedding(torch.from_numpy(navit_position_ids(h, w, 3)).long())
            hidden = torch_model.post_layernorm(torch_model.encoder(inputs_embeds=emb).last_hidden_state)
        np.testing.assert_allclose(out[i, :h * w], hidden[0].numpy(), atol=1e-5, rtol=0)
