"""`python -m kvjax.chat` end to end, as a user runs it (subprocess, offline)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.numpy import load_file, save_file

from kvjax.testing.text import build_tokenizer


def run_chat(*args, home, stdin=None):
    env = {**os.environ, "KVJAX_HOME": str(home), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "kvjax.chat", *args], capture_output=True, text=True,
                          env=env, input=stdin, timeout=300)


def error_lines(proc):
    """stderr minus the informational `kvjax:` banners."""
    return [line for line in proc.stderr.splitlines() if line and not line.startswith("kvjax:")]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("kvjax_home")


@pytest.fixture(scope="module")
def demo_session(home):
    """-> a function returning a default (greedy) in-process session on the demo model in `home`,
    for reference answers; built on first call, so the subprocess is the one that writes the demo."""
    from kvjax.cli.chat import build_parser, build_session

    sessions = []

    def get():
        if not sessions:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("KVJAX_HOME", str(home))
                sessions.append(build_session(build_parser().parse_args(["--demo", "llama", "--quiet"])))
        return sessions[0]

    return get


def test_chat_runs_offline_on_the_builtin_demo(home, demo_session):
    """stdout is exactly the greedy answer (kvjax.generate on the same prompt, decoded) and a newline."""
    from tests.kvjax.cli.answers import prompt_arrays, reference_answer

    proc = run_chat("--demo", "llama", "--question", "hi", "--max-new-tokens", "8", "--time", home=home)
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM weights" in proc.stderr
    assert (home / "demo-llama" / "config.json").is_file()
    messages, session = [{"role": "user", "content": "hi"}], demo_session()
    want, _ = reference_answer(session, messages, max_new_tokens=8)
    assert want and proc.stdout == want + "\n"
    assert f"[time] prompt {prompt_arrays(session, messages)[1]} tokens: prefill" in proc.stderr
    assert "tokens/s" in proc.stderr


def test_question_from_stdin_and_quiet(home, demo_session):
    """The stripped stdin question, sampled with the flags' temperature / top-p and seed 0."""
    from kvjax.sampling import Sampling
    from tests.kvjax.cli.answers import reference_answer

    proc = run_chat("--demo", "llama", "--quiet", "--max-new-tokens", "6", "--temperature", "0.7", "--top-p", "0.9",
                    home=home, stdin="hello there\n")
    assert proc.returncode == 0, proc.stderr
    assert "loading" not in proc.stderr
    messages, session = [{"role": "user", "content": "hello there"}], demo_session()
    want, _ = reference_answer(session, messages, max_new_tokens=6, sampling=Sampling(temperature=0.7, top_p=0.9))
    greedy, _ = reference_answer(session, messages, max_new_tokens=6)
    assert proc.stdout == want + "\n" and want != greedy, (proc.stdout, want, greedy)


@pytest.fixture(scope="module")
def broken_dirs(hf_models, tmp_path_factory):
    """name -> a model dir with one defect."""
    src, _ = hf_models["llama"]
    root = tmp_path_factory.mktemp("broken")
    dirs = {}
    for name in ("no_config", "bad_json", "gpt2", "missing_tensor", "bad_shape"):
        dirs[name] = shutil.copytree(src, root / name)
        build_tokenizer().save_pretrained(dirs[name])
    (dirs["no_config"] / "config.json").unlink()
    (dirs["bad_json"] / "config.json").write_text("{")
    config = json.loads((dirs["gpt2"] / "config.json").read_text())
    (dirs["gpt2"] / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    weights = load_file(src / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "model.norm.weight"},
              dirs["missing_tensor"] / "model.safetensors")
    save_file({**weights, "model.norm.weight": weights["model.norm.weight"][:10]},
              dirs["bad_shape"] / "model.safetensors")
    return dirs


BAD_INPUTS = {
    "missing dir": (["--model-dir", "{root}/does_not_exist"], "does not exist"),
    "no config": (["--model-dir", "{no_config}"], "no config.json"),
    "corrupt config": (["--model-dir", "{bad_json}"], "not valid JSON"),
    "unsupported arch": (["--model-dir", "{gpt2}"], "unsupported architecture GPT2LMHeadModel"),
    "missing tensor": (["--model-dir", "{missing_tensor}"], "model.norm.weight"),
    "misshaped tensor": (["--model-dir", "{bad_shape}"], r"model.norm.weight .* has shape \(10,\)"),
    "zero max-new-tokens": (["--max-new-tokens", "0"], "--max-new-tokens"),
    "top-p out of range": (["--top-p", "1.5"], "top_p must be in"),
    "unknown dtype": (["--dtype", "int8"], "--dtype"),
    "prompt longer than cache": (["--max-tokens", "4"], "does not fit the KV cache.*--max-tokens"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line(case, home, broken_dirs, tmp_path, monkeypatch, capsys):
    """In-process main() (what `python -m kvjax.chat` runs); the subprocess path is checked below."""
    import re

    from kvjax.cli.chat import main

    args, pattern = BAD_INPUTS[case]
    names = {k: str(v) for k, v in broken_dirs.items()} | {"root": str(tmp_path)}
    monkeypatch.setenv("KVJAX_HOME", str(home))
    try:
        code = main([a.format(**names) for a in args] + ["--question", "hello, how are you today?"])
    except SystemExit as e:  # argparse errors
        code = e.code
    lines = [line for line in capsys.readouterr().err.splitlines() if line and not line.startswith("kvjax:")]
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert re.search(pattern, lines[0]), lines[0]


def test_bad_input_exit_code_from_the_command_line(home, tmp_path):
    proc = run_chat("--model-dir", str(tmp_path / "nowhere"), "--question", "hi", home=home)
    assert proc.returncode == 2 and error_lines(proc) == [
        f"error: model directory {str(tmp_path / 'nowhere')!r} does not exist; pass a Hugging Face model directory"]
    proc = run_chat("--top-k", "x", home=home)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1 and "--top-k" in proc.stderr


def test_multi_turn_session_keeps_the_conversation(home, monkeypatch):
    import io

    from kvjax.cli.chat import build_parser, build_session
    from tests.kvjax.cli.answers import reference_answer

    monkeypatch.setenv("KVJAX_HOME", str(home))
    session = build_session(build_parser().parse_args(["--demo", "llama",
                                                       "--max-new-tokens", "6", "--system", "Be brief.", "--quiet"]))
    out = io.StringIO()
    first = session.ask("What is a harbour?", write=out.write)
    second = session.ask("And a library?", write=out.write)
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert session.messages[2]["content"] == first and session.messages[4]["content"] == second
    assert out.getvalue() == first + second  # the pieces streamed add up to the answers
    # The second turn answers the whole conversation, not its last message alone.
    want, _ = reference_answer(session, session.messages[:4], max_new_tokens=6)
    alone, _ = reference_answer(session, [session.messages[0], session.messages[3]], max_new_tokens=6)
    assert second == want != alone, (second, want, alone)


def test_answer_cut_by_a_full_cache_says_so(home, monkeypatch):
    from kvjax.cli.chat import build_parser, build_session

    monkeypatch.setenv("KVJAX_HOME", str(home))
    session = build_session(build_parser().parse_args(["--demo", "llama",
                                                       "--max-new-tokens", "50", "--max-tokens", "20", "--quiet"]))
    session.ask("hello", write=lambda _: None)
    assert session.last.notes == ["answer cut: the KV cache is full (20 tokens); raise --max-tokens"]
    assert session.last.kv_len + session.last.num_generated == 20 + 1
