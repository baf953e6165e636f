"""The router must start without torch (it runs on CPU-only pods and must start in a second)."""

import subprocess
import sys


def test_router_imports_no_torch():
    code = ("import sys, router.app, router.main, protocol.tokenizer, protocol.block_hash;"
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
