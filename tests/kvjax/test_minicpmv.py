"""MiniCPM-V-2.6: the resampler equals a plain numpy reading of its documented math; shapes match
the 2.6 checkpoint; the demo checkpoint loads through the real loader; image features land on the
image_bound spans; image_len with text before and after the image; chat end to end on the demo."""

import json
import math

import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax.errors import CheckpointError
from kvjax.loading import fill_module
from kvjax.vision.minicpmv import MiniCPMVPrompter, chat_ids, image_bounds, preprocess
from kvjax.models.minicpmv import MiniCPMVConfig, Resampler

SAMPLE = "assets/sample.png"


def random_resampler_tensors(rng, num_queries, dim, kv_dim):
    """Checkpoint-named tensors (torch layouts) with every weight, norm and bias random."""
    normal = lambda *shape, scale=0.3: scale * rng.standard_normal(shape)  # noqa: E731
    tensors = {"query": normal(num_queries, dim), "kv_proj.weight": normal(dim, kv_dim),
               "attn.in_proj_weight": normal(3 * dim, dim, scale=dim ** -0.5), "attn.in_proj_bias": normal(3 * dim),
               "attn.out_proj.weight": normal(dim, dim, scale=dim ** -0.5), "attn.out_proj.bias": normal(dim),
               "proj": normal(dim, dim, scale=dim ** -0.5)}
    for norm in ("ln_q", "ln_kv", "ln_post"):
        tensors[f"{norm}.weight"], tensors[f"{norm}.bias"] = 1 + normal(dim), normal(dim)
    return tensors


def numpy_pos_embed(rows, cols, dim):
    """[rows * cols, dim], row-major cells: column half first, each sin(p·ω) then cos(p·ω)."""
    omega = [1 / 10000 ** (k / (dim // 4)) for k in range(dim // 4)]

    def one_d(p):
        return [math.sin(p * w) for w in omega] + [math.cos(p * w) for w in omega]

    return np.array([one_d(c) + one_d(r) for r in range(rows) for c in range(cols)])


def numpy_layer_norm(v, t, name):
    mean, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
    return (v - mean) / np.sqrt(var + 1e-6) * t[f"{name}.weight"] + t[f"{name}.bias"]


def numpy_resampler(t, x, tgt_sizes, num_heads):
    """Per slice, in float64, straight from the reference notes (§4)."""
    head = t["query"].shape[1] // num_heads
    w_q, w_k, w_v = np.split(t["attn.in_proj_weight"], 3)
    b_q, b_k, b_v = np.split(t["attn.in_proj_bias"], 3)
    q = numpy_layer_norm(t["query"], t, "ln_q") @ w_q.T + b_q
    outputs = []
    for feats, (rows, cols) in zip(x, tgt_sizes):
        kv = numpy_layer_norm(feats[:rows * cols] @ t["kv_proj.weight"].T, t, "ln_kv")  # valid patches only
        k = (kv + numpy_pos_embed(rows, cols, q.shape[1])) @ w_k.T + b_k
        v = kv @ w_v.T + b_v
        heads = []
        for h in range(num_heads):
            s = slice(h * head, (h + 1) * head)
            scores = q[:, s] @ k[:, s].T / math.sqrt(head)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            heads.append(probs / probs.sum(-1, keepdims=True) @ v[:, s])
        out = np.concatenate(heads, -1) @ t["attn.out_proj.weight"].T + t["attn.out_proj.bias"]
        outputs.append(numpy_layer_norm(out, t, "ln_post") @ t["proj"])
    return np.stack(outputs)


def test_resampler_matches_numpy_reference():
    rng = np.random.default_rng(0)
    num_queries, dim, heads, kv_dim = 8, 64, 4, 24
    tensors = random_resampler_tensors(rng, num_queries, dim, kv_dim)
    abstract = nnx.eval_shape(lambda: Resampler(num_queries, dim, heads, kv_dim, rngs=nnx.Rngs(0)))
    resampler = fill_module(abstract, tensors.items(), dtype=np.float32)
    tgt_sizes = np.array([(3, 5), (4, 4), (2, 3)], np.int32)  # ragged: 15, 16, 6 patches
    x = rng.standard_normal((3, 16, kv_dim)).astype(np.float32)
    x[0, 15:], x[2, 6:] = 1e4, -1e4  # padding patches must not leak into the output
    ours = np.asarray(resampler(x, tgt_sizes))
    expected = numpy_resampler(tensors, x.astype(np.float64), tgt_sizes, heads)
    assert ours.shape == (3, num_queries, dim)
    np.testing.assert_allclose(ours, expected, atol=2e-4, rtol=2e-4)


def test_packed_attention_weights_follow_torch_multihead_attention():
    """The packed in_proj / key_padding_mask reading, checked against torch's own module."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    tensors = random_resampler_tensors(rng, 4, 32, 16)
    x = rng.standard_normal((2, 6, 16))
    tgt_sizes = np.array([(2, 3), (1, 4)], np.int32)
    mha = torch.nn.MultiheadAttention(32, 2).double()  # sequence-first, as the remote code builds it
    mha.load_state_dict({k.removeprefix("attn."): torch.from_numpy(v) for k, v in tensors.items()
                         if k.startswith("attn.")})
    kv = numpy_layer_norm(x @ tensors["kv_proj.weight"].T, tensors, "ln_kv")
    pos = np.zeros_like(kv)
    for i, (rows, cols) in enumerate(tgt_sizes):
        pos[i, :rows * cols] = numpy_pos_embed(rows, cols, 32)
    q = np.repeat(numpy_layer_norm(tensors["query"], tensors, "ln_q")[:, None], 2, axis=1)
    padding = torch.from_numpy(np.arange(6)[None] >= tgt_sizes.prod(1)[:, None])
    with torch.no_grad():
        out = mha(torch.from_numpy(q), torch.from_numpy(kv + pos).transpose(0, 1), torch.from_numpy(kv).transpose(0, 1),
                  key_padding_mask=padding)[0].transpose(0, 1).numpy()
    expected = numpy_layer_norm(out, tensors, "ln_post") @ tensors["proj"]
    np.testing.assert_allclose(numpy_resampler(tensors, x, tgt_sizes, 2), expected, atol=1e-10)
    abstract = nnx.eval_shape(lambda: Resampler(4, 32, 2, 16, rngs=nnx.Rngs(0)))
    ours = fill_module(abstract, tensors.items(), dtype=np.float32)(x.astype(np.float32), tgt_sizes)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=2e-4, rtol=2e-4)


MINICPMV_26 = {  # the hub config.json fields that shape the model (shared/reference §1)
    "architectures": ["MiniCPMV"], "model_type": "minicpmv", "version": 2.6, "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "vocab_size": 151666, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
    "query_num": 64, "image_size": 448, "patch_size": 14, "use_image_id": True, "slice_mode": True,
    "drop_vision_last_layer": False, "slice_config": {"max_slice_nums": 9, "model_type": "minicpmv"},
    "vision_config": {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "model_type": "siglip",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14}}
RESAMPLER_26 = {"query": (64, 3584), "kv_proj.weight": (3584, 1152), "attn.in_proj_weight": (10752, 3584),
                "attn.in_proj_bias": (10752,), "attn.out_proj.weight": (3584, 3584), "attn.out_proj.bias": (3584,),
                "ln_q.weight": (3584,), "ln_kv.bias": (3584,), "ln_post.weight": (3584,), "proj": (3584, 3584)}


def test_config_and_resampler_shapes_match_the_26_checkpoint(tmp_path):
    from kvjax.loading.minicpmv import _qwen2_text_config

    cfg = MiniCPMVConfig.from_config_json(MINICPMV_26, _qwen2_text_config(tmp_path, MINICPMV_26))
    assert (cfg.query_num, cfg.resampler_heads, cfg.max_slice_nums, cfg.scale_resolution) == (64, 28, 9, 448)
    assert (cfg.vision.num_layers, cfg.vision.grid_size, cfg.vision.hidden_act) == (27, 70, "gelu_pytorch_tanh")
    assert (cfg.text.family, cfg.text.num_kv_heads, cfg.text.head_dim, cfg.text.qkv_bias) == ("qwen2", 4, 128, True)
    abstract = nnx.eval_shape(lambda: Resampler(cfg.query_num, 3584, cfg.resampler_heads, 1152, rngs=nnx.Rngs(0)))
    leaves = {".".join(map(str, path)): v.get_value().shape for path, v in nnx.to_flat_state(nnx.state(abstract))}
    for name, shape in RESAMPLER_26.items():
        kernel = name.removesuffix(".weight") + ".kernel"  # nnx.Linear keeps [in, out]
        assert (leaves[kernel] == shape[::-1]) if kernel in leaves else (leaves[name] == shape), name
    assert set(leaves) == {n.replace("kv_proj.weight", "kv_proj.kernel").replace("out_proj.weight", "out_proj.kernel")
                           for n in RESAMPLER_26} | {"ln_q.bias", "ln_kv.weight", "ln_post.bias"}
    assert MiniCPMVConfig(text=cfg.text, vision=cfg.vision).query_num == 64  # the default


def test_preprocessor_config_slicing_wins_over_slice_config(tmp_path):
    """The original processor slices by preprocessor_config.json; config.json's slice_config is the fallback."""
    from kvjax.loading.minicpmv import _qwen2_text_config

    config = {**MINICPMV_26, "slice_config": {"max_slice_nums": 9, "scale_resolution": 448, "patch_size": 16}}
    text = _qwen2_text_config(tmp_path, config)
    preprocessor = {"max_slice_nums": 4, "scale_resolution": 336, "patch_size": 14, "image_feature_size": 32}
    cfg = MiniCPMVConfig.from_config_json(config, text, preprocessor=preprocessor)
    assert (cfg.max_slice_nums, cfg.scale_resolution, cfg.patch_size, cfg.query_num) == (4, 336, 14, 64)
    partial = MiniCPMVConfig.from_config_json(config, text, preprocessor={"max_slice_nums": 1, "patch_size": 14})
    assert (partial.max_slice_nums, partial.scale_resolution) == (1, 448)
    with pytest.raises(kvjax.KVJaxError, match="patch_size 16"):  # slice_config alone: its patch_size is used
        MiniCPMVConfig.from_config_json(config, text)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from kvjax.testing.vlm import write_vlm_checkpoint

    home = tmp_path_factory.mktemp("kvjax_home")
    path = write_vlm_checkpoint(home / "demo-minicpmv", "minicpmv", init_std=0.1)
    model, tokenizer, cfg = kvjax.load(path)
    return path, model, tokenizer, cfg


def test_demo_is_a_remote_code_layout_loaded_as_data(demo):
    path, model, tokenizer, cfg = demo
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["MiniCPMV"] and "auto_map" in config and not list(path.glob("*.py"))
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "np") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
    assert prefixes == {"llm", "vpm", "resampler"} and cfg.query_num == 16 and cfg.resampler_heads == 2


def test_loader_names_a_missing_resampler_tensor(demo, tmp_path):
    from safetensors.numpy import load_file, save_file

    path = demo[0]
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["resampler.proj"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="resampler.proj"):
        kvjax.load(tmp_path, tokenizer=False)


def test_features_fill_the_image_bounds_and_image_len_counts_text_around_them(demo):
    _, model, tokenizer, cfg = demo
    image = preprocess(SAMPLE, cfg)
    conversation = [{"role": "system", "content": "You describe pictures."},  # text before the image
                    {"role": "user", "content": "What is in this picture? Answer briefly."}]
    prompt = MiniCPMVPrompter(model, tokenizer, cfg).build([conversation, "hello", conversation],
                                                            [image, None, image])
    ids, mask = chat_ids(tokenizer, cfg, conversation, image)
    bounds = image_bounds(ids, tokenizer)
    assert len(bounds) == len(image.strips) == 1 + image.grid[0] * image.grid[1]
    assert np.all(bounds[:, 1] - bounds[:, 0] == cfg.query_num)
    # image_len: through the last feature position; its closing marker and the question are text.
    last_end = int(bounds[-1, 1])
    assert prompt.image_len.tolist() == [last_end, 0, last_end]
    assert tokenizer.decode(ids[last_end:last_end + 1]) == "</slice>" and prompt.lengths[0] > last_end + 10
    assert tokenizer.decode(ids[:bounds[0, 0]]).startswith("<|im_start|>system\nYou describe pictures.")
    # Slice k's features fill span k, in order; everything else keeps its token embedding.
    image_features = nnx.jit(lambda m, inputs: m.image_features(inputs))  # eager op-by-op is slow
    features = np.asarray(image_features(model, image.inputs))
    embeds, table = np.asarray(prompt.embeds), np.asarray(model.language_model.embed(prompt.tokens))
    for k, (start, end) in enumerate(bounds):
        np.testing.assert_allclose(embeds[0, start:end], features[k], atol=5e-5)  # jit vs eager
    is_text = ~prompt.image_mask[0]
    np.testing.assert_allclose(embeds[0][is_text], table[0][is_text], atol=1e-6)
    np.testing.assert_allclose(embeds[2], embeds[0], atol=1e-6)  # batched rows are independent
    np.testing.assert_allclose(embeds[1], table[1], atol=1e-6)
    # Padding slices to the longest one changes nothing: the source image alone gives its row.
    pixels, position_ids, patch_mask, tgt_sizes = image.inputs
    n = int(np.prod(image.tgt_sizes[0]))
    alone = np.asarray(image_features(model, (pixels[:1, ..., :14 * n], position_ids[:1, :n], patch_mask[:1, :n],
                                             tgt_sizes[:1])))
    np.testing.assert_allclose(alone[0], features[0], atol=2e-5)


def test_chat_end_to_end_on_the_demo(demo, monkeypatch, capsys):
    from kvjax import chat

    monkeypatch.setenv("KVJAX_HOME", str(demo[0].parent))  # where --demo minicpmv finds its copy
    rc = chat.main(["--demo", "minicpmv", "--image", SAMPLE, "--question", "What is in the picture?",
                    "--max-new-tokens", "5", "--quiet"])
    out = capsys.readouterr()
    assert rc == 0 and out.out.strip() and "error" not in out.err
    assert chat.main(["--demo", "minicpmv", "--image", "/nonexistent.png", "--question", "hi"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: image file")
