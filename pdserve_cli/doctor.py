"""`pdserve doctor`: what this machine has for pdserve (GPUs, CUDA, FlashInfer, NIXL and UCX, RDMA devices)
and what a worker started here will use. Every probe reports what failed rather than raising."""

import argparse
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

RDMA_SYSFS = Path("/sys/class/infiniband")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch() -> dict[str, Any]:
    try:
        import torch
    except ImportError as e:
        return {"installed": False, "error": str(e)}
    info: dict[str, Any] = {"installed": True, "version": torch.__version__, "cuda_build": torch.version.cuda,
                            "gpus": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": p.name, "capability": f"{p.major}.{p.minor}",
                                 "memory_gib": round(p.total_memory / 2**30, 1)})
    return info


def _driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def _flashinfer() -> dict[str, Any]:
    try:
        import flashinfer
    except Exception as e:  # ImportError, or a CUDA library it cannot load
        return {"installed": False, "error": f"{type(e).__name__}: {e}"}
    return {"installed": True, "version": getattr(flashinfer, "__version__", _version("flashinfer-python"))}


def _nixl() -> dict[str, Any]:
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except Exception as e:
        return {"installed": False, "error": f"{type(e).__name__}: {e}"}
    info: dict[str, Any] = {"installed": True, "version": _version("nixl") or _version("nixl-cu13") or _version("nixl-cu12")}
    try:  # the backend pdserve's transport uses: does it come up on this machine?
        agent = nixl_agent("pdserve-doctor", nixl_agent_config(backends=["UCX"]))
        info["ucx"] = "initialised"
        info["plugins"] = sorted(agent.get_plugin_list())
    except Exception as e:
        info["ucx"] = f"failed: {type(e).__name__}: {e}"
    try:  # UCX's transport modules shipped with NIXL (each one loads where its hardware and driver are)
        import nixl_cu13 as pkg
    except ImportError:
        pkg = None
    if pkg is not None:
        libs = Path(pkg.__file__).parent.parent / "nixl_cu13.libs" / "ucx"
        info["ucx_transport_modules"] = sorted(p.name.split(".")[0].removeprefix("libuct_") for p in libs.glob("libuct_*.so*"))
    return info


def _rdma() -> list[dict[str, str]]:
    devices = []
    for dev in sorted(RDMA_SYSFS.glob("*")) if RDMA_SYSFS.is_dir() else ():
        for port in sorted((dev / "ports").glob("*")):
            state = (port / "state").read_text().strip() if (port / "state").exists() else "?"
            link = (port / "link_layer").read_text().strip() if (port / "link_layer").exists() else "?"
            devices.append({"device": dev.name, "port": port.name, "state": state, "link_layer": link})
    return devices


def report() -> dict[str, Any]:
    torch_info, fi, nx = _torch(), _flashinfer(), _nixl()
    gpus = torch_info.get("gpus", [])
    fp8 = [g["name"] for g in gpus if tuple(map(int, g["capability"].split("."))) >= (8, 9)]
    will = {
        "device": "cuda" if gpus else "cpu",
        "attention_backend": "flashinfer" if gpus and fi["installed"] else "torch",
        "kv_transport_host": "CUDA IPC" if gpus else "shared memory",
        "kv_transport_nixl": "available" if nx["installed"] and nx.get("ucx") == "initialised" and gpus
        else "unavailable (--transport nixl needs a GPU, NIXL and its UCX backend)",
        "fp8": "e4m3 GEMMs and KV cache" if fp8 and len(fp8) == len(gpus)
        else "FP8 checkpoints dequantized (e4m3 GEMMs need an Ada/Hopper GPU or newer)",
    }
    if not torch_info["installed"]:
        will["device"] = "none: torch is not installed (pip install 'pdserve[worker]'); the router runs without it"
    return {"python": sys.version.split()[0], "platform": platform.platform(), "pdserve": _version("pdserve"),
            "torch": torch_info, "nvidia_driver": _driver(), "flashinfer": fi, "nixl": nx, "rdma": _rdma(),
            "pdserve_will_use": will}


def _print(r: dict[str, Any]) -> None:
    t = r["torch"]
    print(f"python {r['python']} on {r['platform']}; pdserve {r['pdserve'] or '(not installed as a package)'}")
    if not t["installed"]:
        print(f"torch: not installed ({t['error']})")
    else:
        print(f"torch {t['version']} (CUDA build: {t['cuda_build'] or 'none'})")
    gpus = t.get("gpus", [])
    if gpus:
        print(f"GPUs: {len(gpus)} (driver {r['nvidia_driver'] or '?'})")
        for i, g in enumerate(gpus):
            print(f"  {i}: {g['name']}, compute {g['capability']}, {g['memory_gib']} GiB")
    else:
        print("GPUs: none (no CUDA GPU visible)")
    for name in ("flashinfer", "nixl"):
        x = r[name]
        print(f"{name}: {x['version'] if x['installed'] else 'not installed'}"
              + ("" if x["installed"] else f" ({x['error']})"))
    if r["nixl"]["installed"]:
        print(f"  UCX backend: {r['nixl']['ucx']}")
        if r["nixl"].get("ucx_transport_modules"):
            print(f"  UCX transport modules: {', '.join(r['nixl']['ucx_transport_modules'])}")
    rdma = r["rdma"]
    print("RDMA devices: " + (", ".join(f"{d['device']}/{d['port']} {d['state']} ({d['link_layer']})" for d in rdma)
                              if rdma else "none"))
    print("pdserve will use:")
    for k, v in r["pdserve_will_use"].items():
        print(f"  {k.replace('_', ' ')}: {v}")


def run(a: argparse.Namespace) -> int:
    r = report()
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        _print(r)
    return 0


def add_command(sub) -> None:
    d = sub.add_parser("doctor", help="what this machine has (GPU, CUDA, FlashInfer, NIXL, RDMA) and what pdserve uses")
    d.add_argument("--json", action="store_true", help="the report as JSON")
    d.set_defaults(run=run)
