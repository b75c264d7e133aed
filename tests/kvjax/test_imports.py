"""The runtime path stays free of torch (an optional extra) and does no work at import."""

import subprocess
import sys


def test_importing_kvjax_imports_neither_torch_nor_transformers():
    code = ("import sys, kvjax, kvjax.chat, kvjax.demo, kvjax.loading, kvjax.steps; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
