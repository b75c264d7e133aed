"""The README's notebook example runs as written."""

import pathlib
import re


def test_readme_notebook_example_runs(tmp_path, monkeypatch, capsys):
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README has no python example"
    monkeypatch.setenv("KVJAX_HOME", str(tmp_path))
    exec(compile(blocks[0], "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "[" in printed  # the example prints kv_len/positions and the decoded texts
