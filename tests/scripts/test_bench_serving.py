"""scripts/bench_serving.py on tiny random checkpoints (CPU), in process to share the imports:
end to end, baseline vs CCM on int8 pages in one byte-sized pool; the demo LLaVA serving image
requests (the demo shapes, then a --config of two experiments over a dataset of its own); the
LLaVA reader, the Poisson arrivals and the flag errors on their own (no model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
# One prompt shape per batch bucket: all at t=0, two per prefill batch, so CCM compresses the first
# two before the last two are admitted.
VLM_FLAGS = ["--like", "llava", "--num-samples", "4", "--req-per-sec", "0", "--max-new-tokens", "3",
             "--page-size", "8", "--max-num-seqs", "4", "--prefill-batch-size", "2", "--decoding-batch-size", "4",
             "--compression-factor", "4", "--no-warmup", "--quiet"]


@pytest.fixture(scope="module")
def kvjax_home(tmp_path_factory):
    """Where --like llava writes the demo VLM (and the demo shapes) once for this module."""
    return tmp_path_factory.mktemp("kvjax_home")


def test_reports_serving_metrics_per_variant(tmp_path, monkeypatch, capsys):
    from kvjax.testing import text as demo

    model_dir = demo.write_checkpoint(tmp_path / "tiny", arch="llama")
    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.chdir(tmp_path)
    import bench_serving

    # All at t=0, one prompt length, CCM over the whole prompt (24 -> 6 slots, one page while it
    # decodes): one compile per step kind and variant.
    code = bench_serving.main(["--model-dir", str(model_dir), "--context-len", "6", "--num-samples", "4",
                               "--req-per-sec", "0", "--max-new-tokens", "3", "--variants", "baseline,ccm+int8",
                               "--image-kv-len", "24", "--compression-factor", "4", "--page-size", "8",
                               "--kv-cache-bytes", "65536", "--max-num-seqs", "4", "--prefill-batch-size", "4",
                               "--decoding-batch-size", "4", "--no-warmup",
                               "--json", "out.json", "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "out.json").read_text())
    assert list(report["variants"]) == ["baseline", "ccm+int8"]
    arrivals = report["arrivals_s"]
    assert arrivals == [0, 0, 0, 0]
    base, ccm = report["variants"]["baseline"], report["variants"]["ccm+int8"]
    for row in (base, ccm):
        assert row["num_requests"] == 4 and row["output_tokens"] == 12 and row["tokens_per_s"] > 0
        assert 0 <= row["ttft_s"]["p50"] <= row["ttft_s"]["p99"] and row["tpot_s"]["p50"] >= 0
        assert 1 <= row["max_concurrent_seqs"] <= 4 and 0 < row["peak_pages"] <= row["num_pages"]
        assert row["num_pages"] == 65536 // row["page_bytes"] and row["pool_bytes"] <= 65536
    assert base["kv_cache_dtype"] == "auto" and ccm["kv_cache_dtype"] == "int8"
    assert ccm["num_pages"] > base["num_pages"]  # int8 pages: more of them in the same bytes
    assert base["mean_prompt_len"] == ccm["mean_prompt_len"] == 24
    assert base["mean_compressed_len"] is None and ccm["mean_compressed_len"] == 24 // 4
    assert ccm["pages_freed_by_compression"] > 0
    assert report["environment"]["command"]
    assert "TTFT" in capsys.readouterr().out


def test_serves_image_requests_and_ccm_holds_fewer_pages(tmp_path, monkeypatch, kvjax_home):
    monkeypatch.setenv("KVJAX_HOME", str(kvjax_home))
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_serving

    # No --dataset: the demo shapes, each prompt built by LLaVA's prompter and sent as embeddings.
    code = bench_serving.main([*VLM_FLAGS, "--variants", "baseline,ccm", "--json", str(tmp_path / "out.json")])
    assert code == 0
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["vlm"] == "LlavaConfig" and list(report["variants"]) == ["baseline", "ccm"]
    base, ccm = report["variants"]["baseline"], report["variants"]["ccm"]
    for row in (base, ccm):
        assert row["num_requests"] == 4 and row["output_tokens"] == 12 and row["tokens_per_s"] > 0
        assert row["ttft_s"]["p50"] > 0 and row["tpot_s"]["p99"] >= row["tpot_s"]["p50"] >= 0
        assert row["peak_kv_bytes"] == row["peak_pages"] * row["page_bytes"] > 0 and row["preempted"] == 0
        # The image span: BOS, "USER: " and the 16 image features of the demo tower, then the question.
        assert 16 < row["mean_image_len"] < row["mean_prompt_len"]
    assert ccm["mean_compressed_len"] < ccm["mean_prompt_len"] / 2
    # All four run at once either way; baseline holds four whole prompts, CCM two fresh ones beside
    # two compressed ones, their pages back before the second prefill.
    assert base["max_concurrent_seqs"] == ccm["max_concurrent_seqs"] == 4
    assert ccm["pages_freed_by_compression"] > 0 and ccm["peak_pages"] < 0.75 * base["peak_pages"]


def test_config_runs_each_experiment_over_an_image_dataset(tmp_path, monkeypatch, kvjax_home):
    from PIL import Image

    monkeypatch.setenv("KVJAX_HOME", str(kvjax_home))
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_serving

    (tmp_path / "images").mkdir()
    for name, color in (("red.png", (220, 30, 30)), ("blue.png", (30, 30, 220))):
        Image.new("RGB", (80, 60), color).save(tmp_path / "images" / name)
    records = [{"image": name, "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                 {"from": "gpt", "value": "A colour."}]}
               for name, question in (("red.png", "What colour is it?"), ("blue.png", "Describe the image."))]
    (tmp_path / "data.json").write_text(json.dumps(records))
    (tmp_path / "experiments.yaml").write_text("- {name: base, variants: [baseline]}\n"
                                               "- {name: ccm-cf4, variants: [ccm], compression-factor: 4, "
                                               "req_per_sec: 100, compress_batch_size: 1}\n")
    code = bench_serving.main([*VLM_FLAGS, "--compression-factor", "2", "--dataset", str(tmp_path / "data.json"),
                               "--image-root", str(tmp_path / "images"), "--config", str(tmp_path / "experiments.yaml"),
                               "--json", str(tmp_path / "out.json"), "--png", str(tmp_path / "out.png")])
    assert code == 0
    report = json.loads((tmp_path / "out.json").read_text())
    assert list(report["experiments"]) == ["base", "ccm-cf4"]
    base, ccm = report["experiments"]["base"], report["experiments"]["ccm-cf4"]
    assert base["overrides"] == {"variants": "baseline"}
    assert ccm["overrides"] == {"variants": "ccm", "compression_factor": 4, "req_per_sec": 100.0,
                                "compress_batch_size": 1}
    assert base["arrivals_s"] == [0] * 4 and ccm["arrivals_s"][-1] > 0  # the experiment's own rate
    assert list(base["variants"]) == ["baseline"] and list(ccm["variants"]) == ["ccm"]
    base, ccm = base["variants"]["baseline"], ccm["variants"]["ccm"]
    assert base["num_requests"] == ccm["num_requests"] == 4 and base["mean_prompt_len"] == ccm["mean_prompt_len"]
    assert ccm["mean_compressed_len"] < ccm["mean_prompt_len"] / 3  # compression_factor 4 (the YAML's), not 2
    assert ccm["peak_pages"] < base["peak_pages"]
    assert (tmp_path / "out.png").stat().st_size > 0


def test_reads_llava_questions_and_poisson_arrivals(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_serving

    question = "<image>\nDescribe the picture in a few words."
    data = [{"image": "a.jpg", "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "A cat."}]},
            {"messages": [{"role": "user", "content": "Hello there?"}]}, {"conversations": []}]
    (tmp_path / "data.json").write_text(json.dumps(data))
    assert bench_serving.read_samples(tmp_path / "data.json") == [("Describe the picture in a few words.",
                                                                   tmp_path / "a.jpg"), ("Hello there?", None)]
    assert bench_serving.read_samples(tmp_path / "data.json", "imgs")[0][1] == Path("imgs/a.jpg")
    arrivals = bench_serving.arrival_times(50.0, 8, np.random.default_rng(0))
    assert len(arrivals) == 8 and arrivals[0] == 0 and list(arrivals) == sorted(arrivals) and arrivals[-1] > 0
    assert bench_serving.split_variant("ccm+int8", "auto") == ("ccm", "int8")
    assert bench_serving.split_variant("knorm:0.5", "auto") == ("knorm:0.5", None)


def test_bad_flags_are_clean_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_serving

    assert bench_serving.main(["--like", "nope", "--num-samples", "1"]) == 2
    assert capsys.readouterr().err.startswith("error: --like: unknown nope")
    assert bench_serving.main(["--model-dir", str(tmp_path), "--num-pages", "8", "--kv-cache-bytes", "100"]) == 2
    assert capsys.readouterr().err.startswith("error: --num-pages and --kv-cache-bytes")
    assert bench_serving.main(["--model-dir", str(tmp_path), "--variants", "ccm+int4"]) == 2
    assert capsys.readouterr().err.startswith("error: --variants: 'ccm+int4'")
    # --config: every experiment is checked before the model loads (there is none in tmp_path).
    config = tmp_path / "experiments.yaml"
    for text, message in (("name: one", "expected a YAML list of experiments"),
                          ("- {name: a, req_per_sec: fast}", "experiment 'a': argument --req-per-sec: invalid float"),
                          ("- {name: a, speed: 2}", "experiment 'a': unknown flag 'speed'"),
                          ("- {name: a, dtype: bfloat16}", "experiment 'a': dtype is set once for the whole run"),
                          ("- {name: a, no_warmup: 1}", "experiment 'a': no_warmup is a switch"),
                          ("- {name: a}\n- {name: a}", "two experiments are named 'a'"),
                          ("- {name: a}\n- {name: b, variants: [ccm+int4]}", "experiment 'b': --variants: 'ccm+int4'")):
        config.write_text(text)
        assert bench_serving.main(["--model-dir", str(tmp_path), "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --config {config}: ") and message in err, err
