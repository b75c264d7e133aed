"""`python -m kvjax.chat --press NAME --compression-ratio R` on the demo model (in-process main(), offline)."""

import pytest

from kvjax.cli.chat import main
from tests.kvjax.cli.test_chat_compress import home, monkeypatch_module  # noqa: F401 (fixtures)


def chat(args, capsys) -> tuple[int, list[str]]:
    try:
        code = main(args)
    except SystemExit as e:  # argparse errors
        code = e.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line and not line.startswith("kvjax:")]


@pytest.mark.parametrize("flags,slots", [(["--press", "snapkv", "--press-option", "window_size=4"], "-> 17 slots")])
def test_press_chat_shrinks_the_cache(home, capsys, flags, slots):  # noqa: F811
    code, lines = chat(["--demo", "llama",
                        "--question", "hello there how are you today my friend", "--max-new-tokens", "4", "--time",
                        *flags], capsys)
    assert code == 0, lines
    assert slots in next(line for line in lines if line.startswith("[time] KV cache"))


@pytest.mark.parametrize("flags,message", [(["--press", "nope"], "unknown press 'nope'"),
                                           (["--press", "knorm", "--compression-ratio", "1.5"], "ratio"),
                                           (["--press-protect", "question"], "add --press NAME"),
                                           (["--kv-quantize", "int4"], "invalid choice")])
def test_bad_press_flags_exit_2_with_one_line(home, capsys, flags, message):  # noqa: F811
    code, lines = chat(["--demo", "llama", "--question", "hi", *flags], capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


@pytest.mark.parametrize("flags,slots", [([], "34 -> 34 slots, int8 K/V"), (["--press", "knorm"], "34 -> 17 slots, int8 K/V")])
def test_int8_chat_reports_the_smaller_cache(home, capsys, flags, slots):  # noqa: F811
    """int8 alone keeps every slot; after a press it quantizes what the press kept."""
    try:
        code = main(["--demo", "llama",
                     "--question", "hello there how are you today my friend", "--max-new-tokens", "4", "--time",
                     "--max-tokens", "128", "--kv-quantize", "int8", *flags])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    assert code == 0 and captured.out.strip(), captured.err
    line = next(line for line in captured.err.splitlines() if line.startswith("[time] KV cache"))
    assert slots in line, line
    ratio = float(line.split("slots, int8 K/V, ")[1].split("x smaller")[0])
    assert ratio > (3.0 if flags else 1.5), line  # float32 demo: int8 + a scale per 32-dim row ~ 0.28x


def test_question_span_survives_a_strong_press(home):  # noqa: F811
    """--press-protect question keeps the latest user message outside the budget: at ratio 0.9 the
    context shrinks tenfold and every question token stays; multi-turn, with int8 on top."""
    import io

    import numpy as np

    import kvjax
    from kvjax.cli.chat import build_parser, build_session
    from kvjax.prompts import bucket, encode_chat
    from kvjax.session import tail_len

    args = build_parser().parse_args(["--demo", "llama",
                                      "--max-new-tokens", "3", "--press", "knorm", "--compression-ratio", "0.9",
                                      "--press-protect", "question", "--kv-quantize", "int8", "--quiet",
                                      "--max-tokens", "128"])
    session = build_session(args)
    tokenizer, cfg = session.tokenizer, session.cfg
    session.ask("tell me about the sea and the old harbour", write=io.StringIO().write)
    question = "what colour was the boat?"
    session.ask(question, write=io.StringIO().write)
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
    messages = session.messages[:-1]
    ids = encode_chat(tokenizer, messages)
    n = tail_len(ids, encode_chat(tokenizer, messages[:-1] + [{"role": "user", "content": ""}]))
    assert question in tokenizer.decode(ids[-n:]) and n < len(ids) // 2
    assert session.last.kv_len == n + int((len(ids) - n) * 0.1)
    tokens = np.zeros((1, bucket(len(ids), smallest=64)), np.int32)  # the shapes chat compiled: no new compile
    tokens[0, :len(ids)] = ids
    _, cache = kvjax.prefill(session.model, kvjax.KVCache.for_model(cfg, 1, 128), tokens, np.array([len(ids)]))
    kept = kvjax.presses.kept_tokens(cache, session.method[0], protect_last=n)  # [L, B, Hkv, S]
    assert kept[..., len(ids) - n:len(ids)].all() and kept[..., :len(ids)].sum(-1).max() < len(ids)


def test_question_span_of_an_image_prompt_excludes_the_image():
    from kvjax.session import tail_len
    from kvjax.testing.text import build_tokenizer
    from kvjax.vision.llava import render_llava

    tokenizer = build_tokenizer()
    chat = [{"role": "user", "content": "describe it"}, {"role": "assistant", "content": "a cat"}]

    def ids(messages):
        return tokenizer(render_llava(messages, has_image=True))["input_ids"]

    for messages in (chat[:1], chat + [{"role": "user", "content": "and its colour?"}]):
        n = tail_len(ids(messages), ids(messages[:-1] + [{"role": "user", "content": ""}]))
        assert tokenizer.decode(ids(messages)[-n:]).strip().startswith(messages[-1]["content"]), n


@pytest.mark.parametrize("protect", ["image", "both"])
def test_press_protect_image_keeps_the_image_prefix(home, protect):  # noqa: F811
    """--press-protect image|both on the demo LLaVA (system prompt + image: a 46-slot prefix of 70):
    the answer is kvjax's with protect_image=True (and the question kept, for 'both'), and differs
    from kvjax's without, so a dropped protection shows. knorm at ratio 0.2 keeps 56 slots: the
    whole prefix with 'image'; with 'both' the 23 question slots come first and a note says so."""
    import io
    from pathlib import Path

    from kvjax.cli.chat import build_parser, build_session
    from kvjax.session import tail_len
    from tests.kvjax.cli.answers import prompt_arrays, reference_answer

    image = Path(__file__).resolve().parents[3] / "assets" / "sample.png"
    session = build_session(build_parser().parse_args([
        "--demo", "llava", "--image", str(image), "--system", "You describe pictures of the old harbour.",
        "--max-new-tokens", "6", "--press", "knorm", "--compression-ratio", "0.2", "--press-protect", protect,
        "--quiet", "--max-tokens", "128"]))
    answer = session.ask("What is in the picture?", write=io.StringIO().write)
    messages = session.messages[:2]
    ids, _ = session.encode(messages)
    question_len = tail_len(ids, session.encode(messages[:1] + [{"role": "user", "content": ""}])[0])
    options = dict(method=session.method, max_new_tokens=6,
                   protect_last=[question_len] if protect == "both" else None)
    want, kv_len = reference_answer(session, messages, protect_image=True, **options)
    unprotected, _ = reference_answer(session, messages, **options)
    image_len = prompt_arrays(session, messages)[3]
    assert session.last.kv_len == kv_len
    if protect == "image":  # the whole prefix is kept
        assert 0 < image_len < kv_len and not session.last.notes
    else:  # the image outgrows the budget the question leaves, and the user is told
        assert image_len + question_len > kv_len and "exceeds" in session.last.notes[0]
    assert answer == want and want != unprotected, (answer, want, unprotected)
