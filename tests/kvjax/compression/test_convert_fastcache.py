"""FastCache .pth -> kvjax: the converted compressor equals running FastCache's torch modules."""

import pickle

import numpy as np
import pytest
import torch
from torch import nn

import kvjax
from kvjax.compression.checkpoint import load_compressor
from kvjax.cli.convert_fastcache import main
from kvjax.compression.fastcache import convert_fastcache

LAYERS, KV_HEADS, HEAD_DIM, CF = 2, 2, 24, 3


def fastcache_block(cf, head_dim):
    """FastCache's compress block: indices 0/3/6 are the Linears (the state-dict keys depend on it)."""
    return nn.Sequential(nn.Linear(head_dim * cf, head_dim), nn.ReLU(), nn.Dropout(0.4),
                         nn.Linear(head_dim, head_dim), nn.ReLU(), nn.Dropout(0.4), nn.Linear(head_dim, head_dim))


class FastCacheDecouple(nn.Module):
    """The module layout of FastCache's KVCacheLinearDecoupleCompressor (tk, tv, ik, iv, attention)."""

    def __init__(self, layers, head_dim, cf, image=True):
        super().__init__()
        names = ("tk", "tv", "ik", "iv") if image else ("tk", "tv")
        for name in names:
            setattr(self, f"compress_{name}", nn.ModuleList(fastcache_block(cf, head_dim) for _ in range(layers)))
        if image:
            self.attention = nn.ModuleList(nn.Linear(head_dim, 1) for _ in range(layers))

    @staticmethod
    def compress_span(x, block, cf, min_seq_len):
        """x [B, H, S, D]: groups of cf tokens through block, leftovers appended (FastCache's compress_layer)."""
        b, h, s, d = x.shape
        n = s // cf
        if n < min_seq_len:
            return x
        merged = block(x[:, :, :n * cf].reshape(b, h, n, cf * d))
        return torch.cat([merged, x[:, :, n * cf:]], dim=2)

    def forward(self, k, v, image_len, min_seq_len=2):
        out = []
        for layer in range(len(self.compress_tk)):
            kk, vv = k[layer], v[layer]
            parts_k, parts_v = [], []
            if hasattr(self, "compress_ik"):
                parts_k.append(self.compress_span(kk[:, :, :image_len], self.compress_ik[layer], CF, min_seq_len))
                parts_v.append(self.compress_span(vv[:, :, :image_len], self.compress_iv[layer], CF, min_seq_len))
                kk, vv = kk[:, :, image_len:], vv[:, :, image_len:]
            parts_k.append(self.compress_span(kk, self.compress_tk[layer], CF, min_seq_len))
            parts_v.append(self.compress_span(vv, self.compress_tv[layer], CF, min_seq_len))
            out.append((torch.cat(parts_k, 2), torch.cat(parts_v, 2)))
        return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.conftest import write_hf_model

    path = tmp_path_factory.mktemp("lm")
    write_hf_model(path, "llama", num_hidden_layers=LAYERS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM)
    return path


def wrapper_dict(module):
    """What FastCache's save_checkpoint writes (optimizer state included)."""
    optimizer = torch.optim.Adam(module.parameters(), lr=5e-4)
    return {"epoch": 3, "model_state_dict": {"compressor": module.state_dict()},
            "optimizer_state_dict": optimizer.state_dict(), "scheduler_state_dict": None, "loss": 0.25}


@pytest.mark.parametrize("image", [True, False])
def test_converted_equals_torch_modules(tmp_path, model_dir, image):
    torch.manual_seed(0)
    module = FastCacheDecouple(LAYERS, HEAD_DIM, CF, image=image).eval()
    torch.save(wrapper_dict(module) if image else module.state_dict(), tmp_path / "ccm.pth")
    out = convert_fastcache(tmp_path / "ccm.pth", model_dir, tmp_path / "converted")
    compressor = load_compressor(out)
    assert compressor.cfg.compression_factor == CF
    assert compressor.cfg.image_mode == ("image_mlp" if image else "text_mlp")
    assert compressor.cfg.rope_positions == ("compressed" if image else "original")

    seq, image_len = 31, 14  # image 14 = 4 groups + 2 leftovers, text 17 = 5 groups + 2
    rng = np.random.default_rng(0)
    k = rng.standard_normal((LAYERS, 2, KV_HEADS, 40, HEAD_DIM)).astype(np.float32)
    v = rng.standard_normal(k.shape).astype(np.float32)
    with torch.no_grad():
        want = module(torch.tensor(k[:, :, :, :seq]), torch.tensor(v[:, :, :, :seq]), image_len)
    cache = kvjax.KVCache(*map(np.asarray, (k, v)), kv_len=np.array([seq, seq], np.int32),
                          positions=np.array([seq, seq], np.int32))
    got = kvjax.compress(kvjax.KVCache(*(np.asarray(x) for x in (cache.k, cache.v, cache.kv_len, cache.positions))),
                         compressor, [image_len, image_len])
    new_len = want[0][0].shape[2]
    assert (np.asarray(got.kv_len) == new_len).all()
    for layer, (wk, wv) in enumerate(want):
        np.testing.assert_allclose(np.asarray(got.k[layer, :, :, :new_len]), wk.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(got.v[layer, :, :, :new_len]), wv.numpy(), atol=1e-5, rtol=0)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def write_bad(path, what):
    if what == "garbage":
        path.write_bytes(b"not a checkpoint at all" * 10)
    elif what == "code":
        torch.save({"model_state_dict": {"compressor": Evil()}}, path)
    elif what == "plain_pickle":
        path.write_bytes(pickle.dumps({"a": 1}))
    elif what == "missing_layer":
        sd = FastCacheDecouple(LAYERS - 1, HEAD_DIM, CF).state_dict()
        torch.save(sd, path)
    elif what == "misshaped":
        sd = FastCacheDecouple(LAYERS, HEAD_DIM, CF).state_dict()
        sd["compress_tv.1.3.weight"] = torch.zeros(HEAD_DIM, HEAD_DIM + 1)
        torch.save(sd, path)
    elif what == "wrong_head_dim":
        torch.save(FastCacheDecouple(LAYERS, 16, CF).state_dict(), path)
    elif what == "unknown_key":
        sd = FastCacheDecouple(LAYERS, HEAD_DIM, CF).state_dict()
        sd["decoder.weight"] = torch.zeros(2)
        torch.save(sd, path)


@pytest.mark.parametrize("what,message", [
    ("garbage", "not a readable PyTorch checkpoint"),
    ("code", r"pickled code or Python objects \(print\)"),
    ("plain_pickle", "not a readable PyTorch checkpoint|not a compressor state dict"),
    ("missing_layer", "lacks compress_tk.1.0.weight"),
    ("misshaped", r"compress_tv.1.3.weight has shape \(24, 25\), expected \(24, 24\)"),
    ("wrong_head_dim", "head_dim 16 .* head_dim 24"),
    ("unknown_key", "decoder.weight"),
])
def test_bad_checkpoints_get_one_clear_error(tmp_path, model_dir, capsys, what, message):
    write_bad(tmp_path / "bad.pth", what)
    code = main(["--input", str(tmp_path / "bad.pth"), "--model-dir", str(model_dir),
                 "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert __import__("re").search(message, err), err
    assert "pwned" not in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_existing_output_is_kept_unless_overwrite(tmp_path, model_dir, capsys):
    torch.save(FastCacheDecouple(LAYERS, HEAD_DIM, CF).state_dict(), tmp_path / "ccm.pth")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    args = ["--input", str(tmp_path / "ccm.pth"), "--model-dir", str(model_dir), "--output", str(tmp_path / "out")]
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert main(args + ["--overwrite"]) == 0
    assert load_compressor(tmp_path / "out").cfg.image_mode == "image_mlp"


def test_missing_torch_is_named(tmp_path, model_dir, monkeypatch, capsys):
    torch.save(FastCacheDecouple(LAYERS, HEAD_DIM, CF).state_dict(), tmp_path / "ccm.pth")
    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    assert main(["--input", str(tmp_path / "ccm.pth"), "--model-dir", str(model_dir),
                 "--output", str(tmp_path / "o")]) == 2
    assert "needs PyTorch" in capsys.readouterr().err


def test_older_wrapper_converts_like_the_bare_state_dict(tmp_path, model_dir):
    """FastCache's older scripts save {'compressor': state_dict}: it converts to the same weights."""
    torch.manual_seed(0)
    module = FastCacheDecouple(LAYERS, HEAD_DIM, CF).eval()
    torch.save({"compressor": module.state_dict()}, tmp_path / "old.pth")
    torch.save(module.state_dict(), tmp_path / "bare.pth")
    old = load_compressor(convert_fastcache(tmp_path / "old.pth", model_dir, tmp_path / "a"))
    bare = load_compressor(convert_fastcache(tmp_path / "bare.pth", model_dir, tmp_path / "b"))
    np.testing.assert_array_equal(np.asarray(old.text_k.w1[...]), np.asarray(bare.text_k.w1[...]))
    np.testing.assert_array_equal(np.asarray(old.image_v.b3[...]), np.asarray(bare.image_v.b3[...]))


class SystemCall:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_pickled_code_is_refused_naming_the_global(tmp_path, model_dir, capsys):
    torch.save({"compress_tk.0.0.weight": torch.zeros(2), "x": SystemCall()}, tmp_path / "evil.pth")
    code = main(["--input", str(tmp_path / "evil.pth"), "--model-dir", str(model_dir), "--output",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pickled code" in err[0] and "posix.system" in err[0]
    assert "re-download" not in err[0] and not (tmp_path / "out").exists()
