"""The container image (Dockerfile) and the GPU extra (issue 39). This machine cannot pull base images, so the
Dockerfile is linted (hadolint) and held to what the package and the chart need: the version everywhere the
same, the chart's default image the one it builds, the commands the chart runs inside the wheel it installs, a
non-root user the chart's pods run as. The `[gpu]` extra resolves against the index."""

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.deploy.test_helm_chart import CHART, ROOT, _find, render

DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _stages() -> dict[str, str]:
    """Each build stage's text, by its name."""
    parts = re.split(r"^FROM .* AS (\w+)$", DOCKERFILE.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_the_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    r = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_one_version_and_the_charts_default_image_is_the_one_built():
    version = PYPROJECT["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == version
    args = re.findall(r"^ARG PDSERVE_VERSION=(\S+)$", DOCKERFILE.read_text(), flags=re.M)
    assert args and set(args) == {version}
    assert f"ghcr.io/pdserve/pdserve:{version} ." in DOCKERFILE.read_text()  # the build command it documents
    router = _find(render(), "Deployment", "-router")["spec"]["template"]["spec"]["containers"][0]
    assert router["image"] == f"ghcr.io/pdserve/pdserve:{version}"
    pinned = _find(render("--set", "image.tag=0.2.0"), "Deployment", "-router")
    assert pinned["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/pdserve/pdserve:0.2.0"


def test_what_the_image_installs_runs_what_the_chart_and_its_cmds_ask(tmp_path):
    stages = _stages()
    assert list(stages) == ["wheel", "cpu", "gpu"]  # the GPU image is the default target (the last)
    assert "[gpu]" in stages["gpu"] and "[worker]" in stages["cpu"]
    assert set(PYPROJECT["project"]["optional-dependencies"]["gpu"]) >= {"pdserve[worker]"}
    assert any(r.startswith("ray") for r in PYPROJECT["project"]["optional-dependencies"]["worker"])  # `ray start`
    # The wheel the image installs, built the same way, holds the modules and scripts the chart and CMDs run.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("pdserve-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    docs = render()
    router = _find(docs, "Deployment", "-router")["spec"]["template"]["spec"]["containers"][0]
    worker = _find(docs, "StatefulSet", "-decode")["spec"]["template"]["spec"]["containers"][0]
    modules = re.findall(r"python -m ([\w.]+)", " ".join(router["command"] + worker.get("args", [])))
    assert {"router.main", "worker.serve"} <= set(modules)
    for cmd in re.findall(r"^CMD (\[.*\])$", DOCKERFILE.read_text(), flags=re.M):
        argv = json.loads(cmd)
        if argv[:2] == ["python", "-m"]:
            modules.append(argv[2])
        else:
            assert argv[0] in PYPROJECT["project"]["scripts"], argv
    for m in modules:
        assert f"{m.replace('.', '/')}.py" in names, f"{m} is not in the wheel"
    assert "router/dashboard/index.html" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "pdserve = pdserve_cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    # Non-root, as the chart's pods run; the build context leaves out what the wheel must not carry.
    pod = _find(docs, "StatefulSet", "-decode")["spec"]["template"]["spec"]["securityContext"]
    for stage in ("cpu", "gpu"):
        user = re.findall(r"^USER (\d+):(\d+)$", stages[stage], flags=re.M)
        assert user == [(str(pod["runAsUser"]), str(pod["runAsGroup"]))], stage
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".gpu"} <= ignored
    packages = [p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]
    assert packages and all((ROOT / p).is_dir() for p in packages)
    for p in [*packages, "pyproject.toml", "README.md", f"{packages[0]}/__init__.py"]:
        assert not [pat for pat in ignored if fnmatch.fnmatch(p, pat.rstrip("/"))], f"{p} is left out of the build context"


def test_the_gpu_extra_resolves_against_the_index(tmp_path):
    """pip resolves the extra's pinned FlashInfer and NIXL builds (and what they need) beside this torch."""
    gpu = [r for r in PYPROJECT["project"]["optional-dependencies"]["gpu"] if not r.startswith("pdserve")]
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report), *gpu],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and os.environ.get("CI") != "true" and not _index_reachable():
        pytest.skip("no package index reachable from here")
    assert r.returncode == 0, r.stderr[-2000:]
    got = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    for req in gpu:
        name, _, pin = req.partition("==")
        if pin:
            assert got.get(name.lower()) == pin, (req, got)
    assert "torch" not in got  # the installed torch (>= 2.11) is what FlashInfer takes


def _index_reachable() -> bool:
    r = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "nixl"], capture_output=True, timeout=120)
    return r.returncode == 0
