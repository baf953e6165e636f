"""The Helm chart lints, renders valid Kubernetes objects, and wires what the code expects."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "pdserve"
MULTINODE = CHART / "examples" / "values-multinode-tp-ep.yaml"
K8S_VERSION = "1.30.0"
CRDS = {"ServiceMonitor", "RayCluster"}  # not in the Kubernetes schemas; checked by assertions below


def _helm() -> str:
    helm = ROOT / ".tools" / "bin" / "helm"
    found = str(helm) if helm.exists() else shutil.which("helm")
    if found is None:
        if os.environ.get("CI") == "true":
            raise RuntimeError("helm is missing: .ci/run installs it with ../shared/tools/get-helm.sh")
        pytest.skip("helm is not installed (bash ../shared/tools/get-helm.sh .tools/bin)")
    return found


def render(*args: str) -> list[dict]:
    out = subprocess.run([_helm(), "template", "rel", str(CHART), "--namespace", "serving", *args],
                         check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _find(docs: list[dict], kind: str, suffix: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix))


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


EXTRA_MODELS = ["--set-json", 'extraModels=[{"key": "coder", "path": "/models/coder", "servedModelName": "coder", '
                '"prefillReplicas": 1, "decodeReplicas": 2}, {"key": "small", "path": "/models/small.gguf", '
                '"decodeReplicas": 1}]']


@pytest.mark.parametrize("values", [[], ["-f", str(MULTINODE)], EXTRA_MODELS],
                         ids=["default", "multinode-tp-ep", "extra-models"])
def test_chart_lints_and_renders_valid_kubernetes_objects(values):
    subprocess.run([_helm(), "lint", str(CHART), *values], check=True, capture_output=True)
    import kubernetes_validate

    docs = render(*values)
    for doc in docs:
        if doc["kind"] in CRDS:
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_router_gets_redis_discovery_and_secrets_from_references():
    docs = render("--set", "router.apiKeysSecret.name=keys")
    router = _find(docs, "Deployment", "-router")["spec"]["template"]["spec"]
    env = _env(router["containers"][0])
    assert env["PDSERVE_REDIS_URL"]["value"] == "redis://rel-pdserve-redis:6379/0"
    assert _find(docs, "Service", "-redis")["metadata"]["name"] == "rel-pdserve-redis"
    assert env["PDSERVE_DISCOVERY"]["value"] == "kubernetes"
    assert env["PDSERVE_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "keys", "key": "keys"}
    assert "value" not in env["PDSERVE_INTERNAL_TOKEN"]
    # Cluster mode: API keys on, the admin token from a Secret the chart made (kept across upgrades).
    assert env["PDSERVE_AUTH"]["value"] == "true"
    admin = env["PDSERVE_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    secret = _find(docs, "Secret", "-admin-token")
    assert admin["name"] == secret["metadata"]["name"] and admin["key"] in secret["data"]
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert env["PDSERVE_MAX_QUEUED_PREFILL_TOKENS"]["value"] == "2000000" and "PDSERVE_TTFT_SLO_S" not in env
    role = _find(docs, "Role", "-router")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                             {"apiGroups": ["apps"], "resources": ["statefulsets/scale"], "verbs": ["get", "patch"],
                              "resourceNames": ["rel-pdserve-prefill", "rel-pdserve-decode"]}]
    assert env["PDSERVE_K8S_DECODE_STATEFULSET"]["value"] == _find(docs, "StatefulSet", "-decode")["metadata"]["name"]
    assert router["serviceAccountName"] == "rel-pdserve-router"
    external = render("--set", "redis.enabled=false", "--set", "redis.externalUrl=redis://r:6379/1")
    assert _env(_find(external, "Deployment", "-router")["spec"]["template"]["spec"]["containers"][0]
                )["PDSERVE_REDIS_URL"]["value"] == "redis://r:6379/1"
    assert not [d for d in external if d["metadata"]["name"].endswith("-redis")]


def test_worker_env_matches_the_worker_flags_and_probes_hit_real_endpoints():
    from protocol.env_args import EnvDefaultsParser  # noqa: F401 - the mechanism that reads PDSERVE_*
    from worker import serve

    docs = render("--set", "cluster.blockSize=32", "--set", "cluster.transport=host")
    flags = _flags(serve)
    for role in ("prefill", "decode"):
        pod = _find(docs, "StatefulSet", f"-{role}")["spec"]["template"]["spec"]
        c = pod["containers"][0]
        env = _env(c)
        assert env["PDSERVE_BLOCK_SIZE"]["value"] == "32" and env["PDSERVE_TRANSPORT"]["value"] == "host"
        assert env["PDSERVE_ROLE"]["value"] == role
        for name in env:
            if name.startswith("PDSERVE_") and name != "PDSERVE_INTERNAL_TOKEN":
                assert name[len("PDSERVE_"):].lower() in flags, f"{name} matches no worker flag"
        paths = {c[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
        assert paths <= _worker_routes()
        assert c["lifecycle"]["preStop"] and pod["terminationGracePeriodSeconds"] > int(
            env["PDSERVE_DRAIN_TIMEOUT_S"]["value"])
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert _find(docs, "PodDisruptionBudget", f"-{role}")["spec"]["maxUnavailable"] == 1
    router = _find(docs, "Deployment", "-router")["spec"]["template"]["spec"]["containers"][0]
    assert router["readinessProbe"]["httpGet"]["path"] in _router_routes()


def test_router_env_matches_the_router_flags_and_carries_the_routing_weights():
    from router import main as router_main

    docs = render("--set-json", "router.loadWeight=0.5", "--set-json", "router.balanceRatio=1.3",
                  "--set-json", "router.balanceWeight=2", "--set-json", "router.churnWeight=0.1")
    env = _env(_find(docs, "Deployment", "-router")["spec"]["template"]["spec"]["containers"][0])
    flags = _flags(router_main)
    for name in env:
        assert name[len("PDSERVE_"):].lower() in flags, f"{name} matches no router flag"
    assert env["PDSERVE_LOAD_WEIGHT"]["value"] == "0.5" and env["PDSERVE_BALANCE_RATIO"]["value"] == "1.3"
    assert env["PDSERVE_BALANCE_WEIGHT"]["value"] == "2" and env["PDSERVE_CHURN_WEIGHT"]["value"] == "0.1"
    from router.config import BALANCE_RATIO, BALANCE_WEIGHT, CHURN_WEIGHT, LOAD_WEIGHT

    default = _env(_find(render(), "Deployment", "-router")["spec"]["template"]["spec"]["containers"][0])
    assert (float(default["PDSERVE_LOAD_WEIGHT"]["value"]), float(default["PDSERVE_BALANCE_RATIO"]["value"]),
            float(default["PDSERVE_BALANCE_WEIGHT"]["value"]), float(default["PDSERVE_CHURN_WEIGHT"]["value"])) == (
        LOAD_WEIGHT, BALANCE_RATIO, BALANCE_WEIGHT, CHURN_WEIGHT)  # the chart's defaults are the router's


def test_tracing_values_reach_the_router_and_every_worker_as_their_flags():
    from router import main as router_main
    from worker import serve

    docs = render("--set", "tracing.otlpEndpoint=http://otel:4318", "--set-json", "tracing.ratio=0.25")
    containers = [("router", _find(docs, "Deployment", "-router")["spec"]["template"]["spec"]["containers"][0])]
    containers += [(role, _find(docs, "StatefulSet", f"-{role}")["spec"]["template"]["spec"]["containers"][0])
                   for role in ("prefill", "decode")]
    for who, c in containers:
        env = _env(c)
        assert env["PDSERVE_OTLP_ENDPOINT"]["value"] == "http://otel:4318", who
        assert env["PDSERVE_TRACE_RATIO"]["value"] == "0.25", who
        assert {"otlp_endpoint", "trace_ratio"} <= _flags(router_main if who == "router" else serve)
    off = render()  # off by default: no tracing variables at all
    assert not [c for d in off if d["kind"] in ("Deployment", "StatefulSet")
                for c in d["spec"]["template"]["spec"]["containers"]
                if any(e["name"] == "PDSERVE_OTLP_ENDPOINT" for e in c.get("env", []))]


def test_lora_values_reach_every_worker_as_the_flags_that_parse_them(monkeypatch):
    from worker import serve

    docs = render("--set-json", 'lora={"maxLoras": 4, "maxRank": 32, "maxCpuLoras": 6, "adapters": ['
                  '{"name": "bot", "path": "/models/adapters/bot"}, {"name": "sql", "path": "/models/sql"}]}')
    for role in ("prefill", "decode"):
        env = _env(_find(docs, "StatefulSet", f"-{role}")["spec"]["template"]["spec"]["containers"][0])
        for name in ("PDSERVE_MAX_LORAS", "PDSERVE_MAX_LORA_RANK", "PDSERVE_MAX_CPU_LORAS", "PDSERVE_LORA"):
            monkeypatch.setenv(name, env[name]["value"])
        config, _ = serve.parse_config(["--role", role, "--model", "/models/m", "--port", "8100"])
        assert (config.engine.max_loras, config.engine.max_lora_rank, config.engine.max_cpu_loras) == (4, 32, 6)
        assert config.loras == (("bot", "/models/adapters/bot"), ("sql", "/models/sql"))
    off = _env(_find(render(), "StatefulSet", "-decode")["spec"]["template"]["spec"]["containers"][0])
    assert "PDSERVE_MAX_LORAS" not in off and "PDSERVE_LORA" not in off
    bad = subprocess.run([_helm(), "template", "rel", str(CHART), "--set-json",
                          'lora={"maxLoras": 0, "adapters": [{"name": "bot", "path": "/a"}]}'],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "lora.adapters needs lora.maxLoras" in bad.stderr


def test_extra_models_get_their_own_pools_that_the_routers_discover():
    docs = render(*EXTRA_MODELS)
    router = _env(_find(docs, "Deployment", "-router")["spec"]["template"]["spec"]["containers"][0])
    sets = {d["metadata"]["name"]: d for d in docs
            if d["kind"] == "StatefulSet" and not d["metadata"]["name"].endswith("-redis")}
    expected = {"rel-pdserve-prefill": ("/models/model.gguf", None, 1),
                "rel-pdserve-decode": ("/models/model.gguf", None, 1),
                "rel-pdserve-coder-prefill": ("/models/coder", "coder", 1),
                "rel-pdserve-coder-decode": ("/models/coder", "coder", 2),
                "rel-pdserve-small-decode": ("/models/small.gguf", None, 1)}  # (no prefill replicas: none)
    assert set(sets) == set(expected)
    for name, (path, served, replicas) in expected.items():
        spec = sets[name]["spec"]
        env = _env(spec["template"]["spec"]["containers"][0])
        assert env["PDSERVE_MODEL"]["value"] == path and spec["replicas"] == replicas, name
        assert env.get("PDSERVE_SERVED_MODEL_NAME", {}).get("value") == served, name
        # the routers find every model's workers of a role with one selector
        role = env["PDSERVE_ROLE"]["value"]
        wanted = dict(kv.split("=") for kv in router[f"PDSERVE_K8S_{role.upper()}_SELECTOR"]["value"].split(","))
        assert wanted.items() <= spec["template"]["metadata"]["labels"].items(), name
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    bad = subprocess.run([_helm(), "template", "rel", str(CHART), "--set-json",
                          'extraModels=[{"key": "Bad Key", "path": "/m"}]'], capture_output=True, text=True)
    assert bad.returncode != 0 and "key" in bad.stderr


def test_multinode_workers_become_rayclusters_with_their_ranks():
    docs = render("-f", str(MULTINODE))
    clusters = [d for d in docs if d["kind"] == "RayCluster"]
    assert sorted(d["metadata"]["name"] for d in clusters) == ["rel-pdserve-decode-0", "rel-pdserve-decode-1"]
    spec = clusters[0]["spec"]
    assert spec["workerGroupSpecs"][0]["replicas"] == 1  # TP=4 x EP=4 = 16 GPUs = head node + 1 rank node
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = _env(head)
    assert env["PDSERVE_TP_SIZE"]["value"] == "4" and env["PDSERVE_EP_SIZE"]["value"] == "4"
    assert "ray start" not in head["args"][0]  # KubeRay starts Ray in the head pod itself
    assert env["PDSERVE_TRANSPORT"]["value"] == "nixl" and env["UCX_NET_DEVICES"]["value"] == "mlx5_0:1"
    assert head["resources"]["limits"]["rdma/hca"] == 1
    prefill = _find(docs, "StatefulSet", "-prefill")["spec"]["template"]["spec"]["containers"][0]
    assert prefill["args"][0].startswith("ray start --head --num-gpus=8")
    assert _find(docs, "ServiceMonitor", "rel-pdserve")["spec"]["endpoints"][0]["path"] == "/metrics"
    assert _find(docs, "Ingress", "-router")["spec"]["tls"][0]["secretName"] == "llm-tls"


def test_workers_keep_their_kernel_cache_on_a_named_claim():
    for args, want in (((), {"emptyDir": {}}), (("--set", "workerCache.claimName=kernels"),
                                                   {"persistentVolumeClaim": {"claimName": "kernels"}})):
        docs = render(*args)
        for role in ("prefill", "decode"):
            pod = _find(docs, "StatefulSet", f"-{role}")["spec"]["template"]["spec"]
            cache = next(v for v in pod["volumes"] if v["name"] == "cache")
            assert {k: v for k, v in cache.items() if k != "name"} == want
            mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
            assert mounts["cache"].endswith("/.cache")  # where FlashInfer keeps its built kernels


@pytest.mark.parametrize("bad", ["decode.tpSize=0", "cluster.blockSize=12", "cluster.transport=carrier-pigeon",
                                 "cluster.transport=nccl", "router.toolCallParser=xml",
                                 "router.policy=random", "model.source.type=s3"])
def test_values_schema_rejects_bad_values(bad):
    with pytest.raises(subprocess.CalledProcessError):
        render("--set", bad)


def test_a_worker_spanning_nodes_without_kuberay_is_refused_clearly():
    with pytest.raises(subprocess.CalledProcessError) as e:
        render("--set", "decode.tpSize=16")
    assert "needs kuberay.enabled=true" in e.value.stderr


def _flags(module) -> set[str]:
    import inspect
    import re

    return {m.replace("-", "_") for m in re.findall(r'add_argument\("--([a-z0-9-]+)"', inspect.getsource(module))}


def _worker_routes() -> set[str]:
    from worker.common_routes import common_routes

    class _Rt:  # common_routes only reads the frontend's config at registration time
        config = type("C", (), {"name": "w", "role": "decode"})()

    return {r.path for r in common_routes(_Rt()).routes}


def _router_routes() -> set[str]:
    from router.app import create_app
    from router.config import RouterConfig

    app = create_app(RouterConfig(decode_urls=["http://x"])).api
    return set(app.openapi()["paths"]) | {r.path for r in app.routes if hasattr(r, "path")}


def _dumped(profile, path: Path) -> dict:
    profile.dump(path)
    return yaml.safe_load(path.read_text())


def test_the_sla_planner_gets_its_mode_targets_and_profile(tmp_path):
    from router.planner import Profile

    profile = Profile(prefill=[(128, 9000), (2048, 15000)], decode=[(1, 0.008), (64, 0.012)], model="m", worker="H100")
    values = tmp_path / "planner.yaml"
    values.write_text(yaml.safe_dump({"router": {"planner": {
        "mode": "on", "profile": _dumped(profile, tmp_path / "p.json"),
        "minReplicas": {"prefill": 2, "decode": 1}, "maxReplicas": {"prefill": 12, "decode": 6}}}}))
    docs = render("-f", str(values))
    router = _find(docs, "Deployment", "-router")["spec"]["template"]["spec"]
    env = {k: v.get("value") for k, v in _env(router["containers"][0]).items()}
    assert env["PDSERVE_PLANNER"] == "on" and env["PDSERVE_PLANNER_MIN"] == "2,1"
    assert env["PDSERVE_PLANNER_MAX"] == "12,6" and env["PDSERVE_ITL_SLO_S"] == "0.1"
    mount = router["containers"][0]["volumeMounts"][0]
    assert env["PDSERVE_PLANNER_PROFILE"] == f"{mount['mountPath']}/profile.json"
    config = _find(docs, "ConfigMap", "-planner-profile")
    assert router["volumes"][0]["configMap"]["name"] == config["metadata"]["name"]
    written = tmp_path / "mounted.json"
    written.write_text(config["data"]["profile.json"])
    assert Profile.load(written) == profile  # what the router reads is the profile given
    off = render()
    assert not any(d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-planner-profile") for d in off)
    assert "PDSERVE_PLANNER" not in _env(_find(off, "Deployment", "-router")["spec"]["template"]["spec"]["containers"][0])
    failed = subprocess.run([_helm(), "template", "rel", str(CHART), "--set", "router.planner.mode=dry-run"],
                            capture_output=True, text=True)
    assert failed.returncode != 0 and "router.planner.profile is needed" in failed.stderr
