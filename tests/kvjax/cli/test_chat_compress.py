"""`python -m kvjax.chat --kv-compress ...` end to end on the demo model (subprocess, offline)."""

import pytest

from kvjax.compression.checkpoint import save_compressor
from kvjax.compression.ccm import CompressorConfig, build_compressor
from tests.kvjax.cli.test_chat_cli import error_lines, run_chat


@pytest.fixture(scope="module")
def home(tmp_path_factory, monkeypatch_module):
    from kvjax.testing import text as demo

    home = tmp_path_factory.mktemp("kvjax_home")
    monkeypatch_module.setenv("KVJAX_HOME", str(home))
    demo.ensure_demo_checkpoint()
    return home


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def demo_compressor(home, name, extra=None, **overrides):
    """A compressor checkpoint shaped for the demo model (4 layers, 2 kv heads, head_dim 32)."""
    cfg = CompressorConfig(**{**dict(num_layers=4, num_kv_heads=2, head_dim=32, compression_factor=4), **overrides})
    return save_compressor(home / name, build_compressor(cfg), overwrite=True, extra=extra)


def test_compressed_chat_reports_bytes_and_time(home):
    proc = run_chat("--demo", "llama", "--question", "tell me about the weather today please", "--max-new-tokens", "6",
                    "--kv-compress", "--kv-compress-factor", "3", "--time", home=home)
    assert proc.returncode == 0, proc.stderr
    assert "UNTRAINED" in proc.stderr
    line = next(line for line in proc.stderr.splitlines() if line.startswith("[time] KV cache"))
    assert "compress" in line and "x smaller" in line
    assert proc.stdout.strip()


def test_compressed_chat_with_checkpoint(home, capsys):
    from kvjax.cli.chat import main

    ckpt = demo_compressor(home, "ccm", extra={"model_fingerprint": "another-model"})
    with pytest.warns(UserWarning, match="distilled against other weights than"):  # chat checks the teacher too
        assert main(["--demo", "llama",
                     "--question", "hello hello hello hello hello", "--max-new-tokens", "4", "--kv-compress-ckpt",
                     str(ckpt), "--kv-compress-positions", "compressed", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and "UNTRAINED" not in captured.err


@pytest.mark.parametrize("flags,message", [
    (["--kv-compress-factor", "0"], "expected an integer >= 1"),
    (["--kv-compress", "--kv-compress-min-seq-len", "-1"], "expected an integer >= 0"),
    (["--kv-compress-positions", "sideways"], "invalid choice"),
])
def test_bad_flags_exit_2(home, flags, message):
    proc = run_chat("--demo", "llama", "--question", "hi", *flags, home=home)
    assert proc.returncode == 2
    assert len(error_lines(proc)) == 1 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("case,message", [
    ("wrong_model", r"\(3, 2, 32\).*\(4, 2, 32\)"),
    ("wrong_factor", "merge 4 tokens"),
    ("missing", "does not exist"),
])
def test_mismatched_checkpoints_exit_2_with_one_line(home, capsys, case, message):
    import re

    from kvjax.cli.chat import main

    ckpt = {"wrong_model": lambda: demo_compressor(home, "ccm_wrong", num_layers=3),
            "wrong_factor": lambda: demo_compressor(home, "ccm4"),
            "missing": lambda: home / "nowhere"}[case]()
    flags = ["--kv-compress-factor", "5"] if case == "wrong_factor" else []
    assert main(["--demo", "llama", "--question", "hi", "--quiet", "--kv-compress-ckpt", str(ckpt), *flags]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("kvjax:")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and re.search(message, errors[0]), errors


def test_image_chat_infers_the_image_span(home):
    """--kv-compress-image-len 0 takes image_len from the LLaVA prompt: the image span and the text
    span are compressed separately, so kv_len after = f(image_len) + f(prompt - image_len), and
    --kv-compress-keep-last 7 keeps the text's last 7 tokens out of the groups."""
    import io
    from pathlib import Path

    from kvjax.cli.chat import build_parser, build_session
    from kvjax.vision import image_prefix_len

    image = Path(__file__).resolve().parents[3] / "assets" / "sample.png"
    args = build_parser().parse_args(["--demo", "llava", "--image", str(image), "--max-new-tokens", "2",
                                      "--kv-compress", "--kv-compress-factor", "3", "--kv-compress-keep-last", "7", "--quiet"])
    session = build_session(args)
    session.ask("What is in the picture?", write=io.StringIO().write)
    _, mask = session.encode(session.messages[:1])
    image_len, prompt_len, kv_len = int(image_prefix_len(mask[None])[0]), session.last.num_prompt, session.last.kv_len

    def kept(n, keep=0, cf=3, min_groups=2):
        grouped = max(n - keep, 0)
        return grouped // cf + grouped % cf + n - grouped if grouped // cf >= min_groups else n

    assert 0 < image_len < prompt_len - 7 - 6
    assert kv_len == kept(image_len) + kept(prompt_len - image_len, keep=7)


@pytest.fixture(scope="module")
def sharp_model(home):
    """(model dir, compressor checkpoint): a tiny Llama with init_std 0.3, whose attention is sharp
    enough that RoPE positions change greedy answers (the demo's 0.02 leaves attention near uniform)."""
    from kvjax.testing import write_checkpoint

    model_dir = write_checkpoint(home / "sharp", "llama", init_std=0.3, overwrite=True)
    cfg = CompressorConfig(num_layers=2, num_kv_heads=2, head_dim=16, compression_factor=4)
    return model_dir, save_compressor(home / "sharp_ccm", build_compressor(cfg), overwrite=True)


def test_kv_compress_positions_reach_the_compressor(sharp_model):
    """--kv-compress-positions compressed (the checkpoint's convention is 'original'): the answer is
    kvjax's with rope_positions='compressed', which differs from 'original', so a dropped flag shows."""
    import io

    from kvjax.cli.chat import build_parser, build_session
    from tests.kvjax.cli.answers import reference_answer

    model_dir, ckpt = sharp_model
    session = build_session(build_parser().parse_args([
        "--model-dir", str(model_dir), "--kv-compress-ckpt", str(ckpt), "--kv-compress-positions", "compressed",
        "--max-new-tokens", "8", "--quiet", "--max-tokens", "128"]))
    assert session.method[0].cfg.rope_positions == "original"
    answer = session.ask("tell me about the weather today please", write=io.StringIO().write)
    options = dict(method=session.method, max_new_tokens=8)
    want, kv_len = reference_answer(session, session.messages[:1], rope_positions="compressed", **options)
    original, _ = reference_answer(session, session.messages[:1], rope_positions="original", **options)
    assert session.last.kv_len == kv_len < session.last.num_prompt
    assert answer == want and want != original, (answer, want, original)
