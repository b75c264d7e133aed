"""scripts/load_test.py against a demo-Llama server it starts itself (a child process): every
request is answered, the report has its figures, and the compressed variant saves KV bytes."""

from __future__ import annotations

import json
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def test_load_test_answers_every_request_and_reports(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import load_test

    out = tmp_path / "load.json"
    code = load_test.main(["--serve", "--demo llama --max-num-seqs 4 --max-model-len 256", "--clients", "4",
                           "--requests-per-client", "2", "--req-per-sec", "0", "--prompt-words", "40",
                           "--max-tokens", "4", "--variants", "none,knorm:0.5", "--json", str(out),
                           "--png", str(tmp_path / "load.png")])
    assert code == 0
    report = json.loads(out.read_text())
    for name, r in report["variants"].items():
        assert r["completed"] == r["requests"] == 8 and r["lost"] == 0 and r["errors"] == {}, name
        assert r["output_tokens_per_s"] > 0 and r["ttft_p50_ms"] > 0
    assert report["variants"]["none"]["kv_bytes_saved"] == 0 < report["variants"]["knorm:0.5"]["kv_bytes_saved"]
    assert (tmp_path / "load.png").stat().st_size > 0
