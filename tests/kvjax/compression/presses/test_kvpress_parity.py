"""Kept token sets equal NVIDIA kvpress 0.5.5's on the same tiny Llama (scripts/kvpress_parity.py).

kvpress needs transformers < 5.3, which the project venv cannot have: point KVJAX_KVPRESS_PYTHON at
the python of a separate venv with kvpress installed (see the script's docstring), or install
kvpress beside an older transformers."""

import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "..", "scripts"))
import kvpress_parity  # noqa: E402

KVPRESS_PYTHON = os.environ.get("KVJAX_KVPRESS_PYTHON") or (
    sys.executable if importlib.util.find_spec("kvpress") else None)


# Skips only where kvpress is absent (a plain local run): .ci/run builds the kvpress venv (a failed
# build stops CI) and sets KVJAX_KVPRESS_PYTHON, so in CI this test always runs.
@pytest.mark.skipif(KVPRESS_PYTHON is None, reason="kvpress 0.5.5 is not installed: it needs transformers < 5.3, "
                    "so it lives in its own venv; set KVJAX_KVPRESS_PYTHON to that venv's python as .ci/run does "
                    "(recipe in scripts/kvpress_parity.py)")
def test_kept_sets_equal_kvpress(tmp_path):
    result = kvpress_parity.compare(KVPRESS_PYTHON, tmp_path)
    assert len(result) == len(kvpress_parity.CASES) * len(kvpress_parity.RATIOS)
    assert all(row["match"] for row in result.values()), result
