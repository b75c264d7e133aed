"""Tensor parallelism on forced CPU devices (kvjax.parallel): tp 1, 2, 4 equal one device, for
every compression method, the Pallas kernels per shard, the paged engine, and two processes joined
through jax.distributed. The checks run in subprocesses (tests/kvjax/parallel_checks.py) so that
this process keeps its single device."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kvjax
from kvjax import parallel
from kvjax.testing.text import write_checkpoint
from tests.kvjax.parallel_checks import ONE_PER_STRUCTURE

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["none", "ccm", "snapkv", "pyramidkv", "int8", "ccm+int8"]


def methods_at(tp: str) -> list[str]:
    return METHODS if tp == "4" else ONE_PER_STRUCTURE


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # 8 query / 4 KV heads: splits over 1, 2 and 4 devices; GQA groups of 2.
    return write_checkpoint(tmp_path_factory.mktemp("tp") / "m", "llama", num_hidden_layers=2, hidden_size=64,
                            intermediate_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=16,
                            vocab_size=512)


def _forced_devices(devices: int) -> dict[str, str]:
    """The environment of a subprocess that sees `devices` CPU devices (keeping the suite's XLA flags)."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}


def _checks(model_dir, out: Path, *args, devices: int = 4, env=None) -> subprocess.Popen:
    environ = {**_forced_devices(devices), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "tests.kvjax.parallel_checks", str(model_dir), str(out), *args],
                            cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _report(proc: subprocess.Popen, out: Path, timeout: int = 600) -> dict:
    log, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, log[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def report(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp_report") / "report.json"
    return _report(_checks(model_dir, out), out)


def _close(a, b, tol=1e-4):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max()) <= tol


@pytest.mark.parametrize("tp", ["1", "2", "4"])
def test_tensor_parallel_equals_one_device(report, tp):
    assert report["devices"] == 4
    ref, got = report["dense"]["None"], report["dense"][tp]
    for name in methods_at(tp):
        assert got[name]["tokens"] == ref[name]["tokens"], name
        assert _close(got[name]["logits"], ref[name]["logits"]), name
        assert _close(got[name]["step_logits"], ref[name]["step_logits"]), name
        assert got[name]["kv_len"] == ref[name]["kv_len"], name
    # Compression happened (else the comparison says little): CCM halves, int8 keeps the length.
    assert ref["ccm"]["kv_len"] != ref["none"]["kv_len"] and ref["int8"]["kv_len"] == ref["none"]["kv_len"]


@pytest.mark.parametrize("tp", ["1", "2", "4"])
def test_cache_leaves_are_split_over_kv_heads(report, tp):
    for name in methods_at(tp):
        shardings = report["dense"][tp][name]["shardings"]
        assert shardings["k"] == shardings["v"] == "heads", (name, shardings)
        assert shardings["kv_len"] == "replicated", (name, shardings)
        if "k_scales" in shardings:
            assert shardings["k_scales"] == "heads", (name, shardings)
    assert report["dense"]["None"]["none"]["shardings"]["k"] == "single device"


def test_one_compile_per_step_shape_as_on_one_device(report):
    counts = {tp: run["compiles"]["decode_step"] for tp, run in report["dense"].items()}
    # Three cache structures (dense, per-layer lengths, int8) -> three decode programs, whatever tp.
    assert set(counts.values()) == {3}, counts


def test_paged_engine_tensor_parallel(report):
    for kv_cache_dtype in ("None", "int8"):
        ref, got = report["engine"]["None"][kv_cache_dtype], report["engine"]["2"][kv_cache_dtype]
        assert got["tokens"] == ref["tokens"], kv_cache_dtype
        assert got["pages"] == "heads" and ref["pages"] == "single device"


def test_server_tensor_parallel(report):
    ref, got = report["serve"]["None"], report["serve"]["2"]
    assert (ref["mesh"], got["mesh"]) == (1, 2)
    assert got["none"] == ref["none"] and got["ccm"] == ref["ccm"] and ref["none"]


def test_chat_cli_tensor_parallel(report):
    one, tp2, too_many = (report["chat"][tp] for tp in ("None", "2", "8"))
    assert one["code"] == tp2["code"] == 0, (one["stderr"][-2000:], tp2["stderr"][-2000:])
    assert tp2["stdout"] == one["stdout"] and one["stdout"].strip()
    assert too_many["code"] == 2 and "needs 8 devices but 4 are visible" in too_many["stderr"]


@pytest.mark.parametrize("family", ["llama", "llava"])
def test_loading_places_each_weight_on_the_mesh(report, family):
    """Each tensor goes from the host straight to its shards, never whole on one device first."""
    placed = report["load"][family]
    assert placed["puts"] > 0 and placed["on_the_mesh"] == placed["puts"], placed


def test_indivisible_kv_heads_is_one_clear_error(report):
    assert "num_kv_heads (4) is not divisible by --tensor-parallel 3" in report["indivisible"]


def test_pallas_kernels_run_per_shard(model_dir, tmp_path):
    out = tmp_path / "kernels.json"
    got = _report(_checks(model_dir, out, "--kernels", env={"KVJAX_KERNELS": "interpret"}), out)
    assert got["shard_map_calls"] > 0  # decode attention, CCM and compaction kernels went through shard_map
    ref, tp2 = got["dense"]["None"], got["dense"]["2"]
    for name in ("ccm", "snapkv", "int8"):
        assert tp2[name]["tokens"] == ref[name]["tokens"], name
        assert _close(tp2[name]["step_logits"], ref[name]["step_logits"]), name


def test_two_processes_through_jax_distributed(model_dir, report, tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    procs = [_checks(model_dir, outs[i], "--process-id", str(i), "--port", str(port), devices=2) for i in range(2)]
    got = [_report(p, o, timeout=300) for p, o in zip(procs, outs)]
    for run in got:
        assert (run["processes"], run["devices"], run["local_devices"]) == (2, 4, 2)
    # Greedy tokens of prompts prefilled and decoded at tp 4 across the processes = one process, one device.
    single = report["dense"]["None"]["none"]["tokens"]
    assert got[0]["tokens"] == got[1]["tokens"] == single


def test_bad_sizes_are_clear_errors():
    with pytest.raises(kvjax.KVJaxError, match="needs 2 devices but 1 are visible"):
        parallel.make_mesh(2)
    with pytest.raises(kvjax.KVJaxError, match="positive integer"):
        parallel.make_mesh(0)
