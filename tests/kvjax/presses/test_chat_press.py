"""`python -m kvjax.chat --press NAME --compression-ratio R` on the demo model (in-process main(), offline)."""

import pytest

from kvjax.chat import main
from tests.kvjax.test_chat_compress import home, monkeypatch_module  # noqa: F401 (fixtures)


def chat(args, capsys) -> tuple[int, list[str]]:
    try:
        code = main(args)
    except SystemExit as e:  # argparse errors
        code = e.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line and not line.startswith("kvjax:")]


@pytest.mark.parametrize("flags,slots", [(["--press", "snapkv", "--press-option", "window_size=4"], "-> 17 slots")])
def test_press_chat_shrinks_the_cache(home, capsys, flags, slots):  # noqa: F811
    code, lines = chat(["--question", "hello there how are you today my friend", "--max-new-tokens", "4", "--time",
                        *flags], capsys)
    assert code == 0, lines
    assert slots in next(line for line in lines if line.startswith("[time] KV cache"))


@pytest.mark.parametrize("flags,message", [(["--press", "nope"], "unknown press 'nope'"),
                                           (["--press", "knorm", "--compression-ratio", "1.5"], "ratio")])
def test_bad_press_flags_exit_2_with_one_line(home, capsys, flags, message):  # noqa: F811
    code, lines = chat(["--question", "hi", *flags], capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
