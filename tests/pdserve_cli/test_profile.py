"""`pdserve profile` measures a worker (here the demo model on the CPU) and writes a profile the SLA planner and
the router's --planner-profile read."""

import json
import subprocess
import sys

from bench.cluster import ROOT


def test_profile_writes_what_the_planner_reads(tmp_path):
    from router.planner import Profile

    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, "-m", "pdserve_cli.main", "profile", "--quick", "--device", "cpu",
                           "--contexts", "16,48", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    profile = Profile.load(out)
    assert [n for n, _ in profile.prefill] == [16, 64]
    assert [(b, c) for b, c, _ in profile.decode] == [(1, 16), (1, 48), (4, 16), (4, 48)]
    assert all(r > 0 for _, r in profile.prefill) and all(0 < s < 60 for _, _, s in profile.decode)
    assert printed["out"] == str(out) and "cpu" in profile.worker and profile.model.endswith(".gguf")
    assert profile.max_batch(max(s for _, _, s in profile.decode), context=30) == 4
