"""`pdserve doctor` (issue 39) on this machine: it runs from the installed CLI, and reports what is here
(on a machine without a GPU: no GPU, the CPU, PyTorch attention, shared-memory KV transport) without failing
on what is missing."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

PDSERVE = shutil.which("pdserve") or str(Path(sys.executable).parent / "pdserve")


def test_doctor_reports_this_machine():
    r = subprocess.run([PDSERVE, "doctor", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["torch"]["version"] == torch.__version__
    gpus = report["torch"]["gpus"]
    assert len(gpus) == torch.cuda.device_count()
    will = report["pdserve_will_use"]
    try:
        import flashinfer  # noqa: F401
        has_flashinfer = True
    except Exception:
        has_flashinfer = False
    assert report["flashinfer"]["installed"] is has_flashinfer
    if not gpus:
        assert will["device"] == "cpu" and will["attention_backend"] == "torch"
        assert will["kv_transport_host"] == "shared memory" and will["kv_transport_nixl"].startswith("unavailable")
    else:
        assert will["device"] == "cuda" and will["kv_transport_host"] == "CUDA IPC"
        assert will["attention_backend"] == ("flashinfer" if has_flashinfer else "torch")
    text = subprocess.run([PDSERVE, "doctor"], capture_output=True, text=True, timeout=120, check=True).stdout
    assert f"torch {torch.__version__}" in text and "pdserve will use:" in text
    assert ("GPUs: none" in text) is (not gpus)
