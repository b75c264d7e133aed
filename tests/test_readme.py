"""The README's notebook example runs as written and prints what its comments say."""

import ast
import pathlib
import re

import numpy as np


def test_readme_notebook_example_runs(tmp_path, monkeypatch, capsys):
    from kvjax.compression.presses import compute_n_kept
    from tests.kvjax.cli.answers import prompt_arrays, reference_answer

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README has no python example"
    monkeypatch.setenv("KVJAX_HOME", str(tmp_path))
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    lines = capsys.readouterr().out.split("\n", 4)  # the chat answer (last) may hold any character
    assert len(lines) == 5, lines
    lengths, cfg, session = np.asarray(namespace["lengths"]), namespace["cfg"], namespace["session"]
    assert len(lengths) == 2 and (lengths >= 4).all()  # long enough for CCM (cf 2) to merge

    def printed(*arrays):  # how `print(a, b)` shows int arrays: "[5 2] [5 2]"
        return " ".join("[" + " ".join(str(int(x)) for x in a) + "]" for a in arrays)

    # prefill + one decode step: kv_len and positions both advanced by one
    assert lines[0] == printed(lengths + 1, lengths + 1)
    # generate: the two decoded answers
    texts = ast.literal_eval(lines[1])
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) for t in texts)
    # CCM, cf 2, min_seq_len 2, all text: n -> n // 2 groups + n % 2 leftovers; positions keep counting
    assert lines[2] == printed(lengths // 2 + lengths % 2, lengths)
    # snapkv at ratio 0.5, then int8: kvpress's budget, and int8 K/V (+ scales) well under float32's bytes
    kv_len = [compute_n_kept(int(n), 0.5) for n in lengths]
    head, used = lines[3].split("] [")
    assert head + "]" == printed(kv_len)
    float32_bytes = np.array(kv_len) * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    assert (float32_bytes / np.array(used.rstrip("]").split(), float) > 3).all(), lines[3]
    # the chat session: its greedy answer over the pressed cache, then the slots the press kept
    messages = session.messages[:1]
    want, want_len = reference_answer(session, messages, max_new_tokens=8, method=session.method)
    assert want_len == compute_n_kept(prompt_arrays(session, messages)[1], 0.5)
    assert lines[4] == f"{want} {want_len}\n", lines[4]


def test_readme_serve_example_runs_against_the_shipped_model(capsys):
    """The Serve section's openai client example, as written but for the port (a free one here)."""
    from inference.server import BackgroundServer
    from kvjax.cli.serve import build_parser, load_service

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    example, = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "openai.OpenAI" in b]
    assert "python -m kvjax.serve --port 8000" in readme
    service = load_service(build_parser().parse_args(["--max-model-len", "256", "--max-num-seqs", "2"]))
    with BackgroundServer(service) as server:
        exec(compile(example.replace("http://127.0.0.1:8000", server.url), "README.md", "exec"), {})
    answer, kv, streamed = capsys.readouterr().out.split("\n")[:3]
    assert answer.strip() and streamed.strip()  # the CCM answer, then the streamed full-cache one
    assert kv.startswith("{'method': 'ccm:5', 'prompt_kv_slots': ")
