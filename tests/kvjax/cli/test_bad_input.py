"""Bad input a new user tries: one `error:` line naming the problem and the fix, exit 2, no traceback."""

import io
import json

import numpy as np
import pytest

import kvjax
from kvjax.cli.chat import main as chat


class Stdin(io.TextIOWrapper):
    def isatty(self):
        return False


def run(argv, capsys, monkeypatch, stdin: bytes | None = None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", Stdin(io.BytesIO(stdin)))
    code = chat(argv)
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.startswith(("error", "Traceback"))]


@pytest.mark.parametrize("argv, stdin, message", [
    (["--max-new-tokens", "4"], b"\xff\xfe\x80hello\n", "not UTF-8 text"),
    (["--question", "\udcff\udcfehi"], None, "not valid UTF-8"),
    (["--question", ""], None, "non-empty --question"),
    (["--question", "   "], None, "non-empty --question"),
    (["--question", "hi", "--compression-ratio", "0.5"], None, "add --press NAME"),
])
def test_chat_refuses_with_one_line(argv, stdin, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("KVJAX_HOME", str(tmp_path))  # nothing is loaded before the error
    code, errors = run(argv, capsys, monkeypatch, stdin)
    assert code == 2 and len(errors) == 1 and message in errors[0], errors


def test_a_nan_tensor_is_named_when_loading(tmp_path):
    from safetensors.numpy import load_file, save_file

    from kvjax.testing import write_checkpoint

    path = write_checkpoint(tmp_path / "m", "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    files = sorted(path.glob("*.safetensors"))
    tensors = load_file(str(files[0]))
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = np.full_like(tensors[name], np.nan)
    save_file(tensors, str(files[0]), metadata={"format": "pt"})
    with pytest.raises(kvjax.CheckpointError, match=f"tensor {name} .* NaN/inf"):
        kvjax.load(path)


def test_a_compressor_that_merges_nothing_says_why(home_chat, capsys):
    code = chat(["--demo", "llama",
                 "--question", "hello there", "--kv-compress", "--kv-compress-factor", "1000", "--quiet",
                 "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 0 and "merged nothing" in err and "min_seq_len = 2 groups of 1000 tokens" in err


@pytest.fixture
def home_chat(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("KVJAX_HOME", str(tmp_path_factory.getbasetemp() / "kvjax_home_bad_input"))


def test_evaluate_refuses_a_zero_ccm_factor():
    from kvjax.config import ModelConfig
    from kvjax.evaluation import parse_methods

    with pytest.raises(kvjax.KVJaxError, match="factors >= 1"):
        parse_methods(["ccm:0"], ModelConfig.tiny())


def test_resume_without_checkpoint_in_a_used_dir_points_to_overwrite(tmp_path):
    from training.checkpoints import prepare_out_dir

    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(kvjax.KVJaxError, match="--overwrite"):
        prepare_out_dir(tmp_path, resume=True, overwrite=False)
    with pytest.raises(kvjax.KVJaxError, match="drop --resume"):
        prepare_out_dir(tmp_path / "new", resume=True, overwrite=False)


def test_preprocessor_config_json_must_parse(tmp_path):
    from kvjax.loading.minicpmv import _preprocessor

    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(kvjax.CheckpointError, match="preprocessor_config.json is not valid JSON"):
        _preprocessor(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"max_slice_nums": 4}))
    assert _preprocessor(tmp_path) == {"max_slice_nums": 4}
