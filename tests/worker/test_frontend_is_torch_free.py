"""A worker's frontend process (HTTP, detokenizing, stop strings) imports no torch: it starts in a moment beside
the engine core and holds none of torch's memory; and the shared worker package imports neither role package."""

import ast
import subprocess
import sys
from pathlib import Path


def test_the_frontend_processes_import_no_torch():
    code = ("import sys, decode_worker.app, decode_worker.streams, prefill_worker.app, worker.frontend;"
            "bad = [m for m in ('torch', 'transformers', 'ray') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_worker_package_imports_no_role_package():
    for path in (Path(__file__).resolve().parents[2] / "worker").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] in ("decode_worker", "prefill_worker")], path
