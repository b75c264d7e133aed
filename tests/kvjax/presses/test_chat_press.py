"""`python -m kvjax.chat --press NAME --compression-ratio R` on the demo model (subprocess, offline)."""

import pytest

from tests.kvjax.test_chat_cli import error_lines, run_chat
from tests.kvjax.test_chat_compress import home, monkeypatch_module  # noqa: F401 (fixtures)


@pytest.mark.parametrize("flags,slots", [(["--press", "snapkv", "--press-option", "window_size=4"], "-> 17 slots")])
def test_press_chat_shrinks_the_cache(home, flags, slots):  # noqa: F811
    proc = run_chat("--question", "hello there how are you today my friend", "--max-new-tokens", "4", "--time",
                    *flags, home=home)
    assert proc.returncode == 0, proc.stderr
    assert slots in next(line for line in proc.stderr.splitlines() if line.startswith("[time] KV cache"))


@pytest.mark.parametrize("flags,message", [(["--press", "nope"], "unknown press 'nope'")])
def test_bad_press_flags_exit_2_with_one_line(home, flags, message):  # noqa: F811
    proc = run_chat("--question", "hi", *flags, home=home)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1 and message in proc.stderr
