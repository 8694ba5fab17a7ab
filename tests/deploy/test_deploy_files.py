"""Static checks of deploy/: compose, Kubernetes, Prometheus, the Dockerfile, vllm-args.py.

No Docker engine or cluster is needed: the files are parsed and cross-checked against the
code they drive (settings, routes, the vLLM arguments the gateway would use), and the vLLM
start-up shell lines (vLLM's and the prompt_distance embedder's) are run with a stand-in
for vLLM.
"""

from __future__ import annotations

import http.server
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from ensemble.atomic import sha256_file
from ensemble.manifest import ADAPTER_FILE, EnsembleManifest, LoraSpec, MemberSpec
from server.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
HELPER = DEPLOY / "vllm-args.py"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_GPU = DEPLOY / "compose.gpu.yaml"
PROMETHEUS = DEPLOY / "prometheus.yml"
DOCKERFILE = REPO / "Dockerfile"
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
# Image paths the vLLM start-up line uses; tests substitute local ones.
IMAGE_HELPER = "/app/deploy/vllm-args.py"
IMAGE_ENSEMBLE = "/data/ensemble"
# The vLLM servers of a deployment: the generating one and the prompt_distance embedder (the
# base model as a pooling server). Each is a compose service and a k8s Deployment + Service
# of this name, started by vllm-args.py (with --embedder for the embedder); the gateway
# reaches each through its `softspec serve` flag.
UPSTREAMS = {"vllm": "--vllm-url", "embedder": "--embed-url"}

REQUIRED = [
    "compose.yaml",
    "compose.gpu.yaml",
    "prometheus.yml",
    "vllm-args.py",
    "README.md",
    "k8s/vllm.yaml",
    "k8s/embedder.yaml",
    "k8s/gateway.yaml",
    "k8s/configmap.yaml",
    "k8s/pvc.yaml",
    "k8s/kustomization.yaml",
]
YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"})
OWN_YAML = [p for p in YAML_FILES if "accelerate" not in p.relative_to(DEPLOY).parts]
TEXT_FILES = sorted(
    p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in {".yaml", ".yml", ".md", ".py"}
)
SETTINGS_ENV = {f"SOFTSPEC_{name.upper()}" for name in Settings.model_fields}
# SOFTSPEC_* names that are not serve settings; each must be read by the code named here.
OTHER_ENV = {"SOFTSPEC_HOME": REPO / "softspec" / "paths.py"}


# ---------------------------------------------------------------------------- helpers


def load(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def k8s_docs() -> list[dict[str, Any]]:
    """Every Kubernetes object under deploy/k8s (the kustomization itself is not one)."""
    docs = [d for p in sorted(K8S.glob("*.yaml")) for d in load(p)]
    return [d for d in docs if d.get("kind") != "Kustomization"]


def k8s_find(kind: str, name: str) -> dict[str, Any]:
    for d in k8s_docs():
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise AssertionError(f"no {kind} {name!r} in deploy/k8s")


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    return list(spec.get("containers", [])) + list(spec.get("initContainers", []))


def only_container(doc: dict[str, Any]) -> dict[str, Any]:
    (c,) = doc["spec"]["template"]["spec"]["containers"]
    return c


def compose() -> dict[str, Any]:
    (doc,) = load(COMPOSE)
    return doc


def compose_gpu() -> dict[str, Any]:
    (doc,) = load(COMPOSE_GPU)
    return doc


def env_map(env: Any) -> dict[str, Any]:
    """A compose ``environment`` (mapping or ``KEY=VALUE`` list) as a dict."""
    if env is None:
        return {}
    if isinstance(env, dict):
        return dict(env)
    out: dict[str, Any] = {}
    for item in env:
        key, sep, value = str(item).partition("=")
        out[key] = value if sep else None
    return out


def compose_default(value: Any) -> str | None:
    """The value compose uses when the shell sets nothing (``${X:-d}`` -> d)."""
    if value is None:
        return None
    s = str(value)
    m = re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", s)
    if m:
        return m.group(1)
    return s


def compose_unescape(s: str) -> str:
    """What the container gets: ``$$`` -> ``$``; anything else with ``$`` is interpolation."""
    assert "$" not in s.replace("$$", ""), f"unescaped $ (compose interpolates it): {s!r}"
    return s.replace("$$", "$")


def kubelet_unescape(s: str) -> str:
    """What the container gets: ``$$`` -> ``$``; a ``$(NAME)`` would be a variable."""
    assert "$(" not in s.replace("$$", ""), f"$(...) is kubelet variable syntax: {s!r}"
    return s.replace("$$", "$")


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


def flag(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def helper_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_vllm_args", HELPER)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def helper_port(script: str, embedder: bool = False) -> int:
    """The vLLM port: the ``--port`` the start-up line gives vllm-args.py (or its default).

    Also checks the line asks for the right server: ``--embedder`` exactly when ``embedder``.
    """
    words = shlex.split(script.replace(";", " ; "))
    start = words.index(IMAGE_HELPER) + 1
    end = next((i for i in range(start, len(words)) if words[i].endswith(")")), len(words))
    args = [w.rstrip(")") for w in words[start : end + 1]]
    ns = helper_module().build_parser().parse_args(args)
    assert Path(ns.ensemble) == Path(IMAGE_ENSEMBLE)
    assert ns.embedder is embedder, f"--embedder {'missing from' if embedder else 'in'} {args}"
    return int(ns.port)


def gateway_flags(argv: list[str], url_flag: str = "--vllm-url") -> tuple[str, int]:
    """``url_flag`` (default ``--vllm-url``) and ``--port`` of a ``softspec serve`` line."""
    assert argv[0] == "serve", argv
    return flag(argv, url_flag), int(flag(argv, "--port"))


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTSPEC_")}
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def make_ensemble(root: Path, k: int = 3, r: int = 12, name: str = "ens") -> EnsembleManifest:
    """A small ensemble directory (fake adapter bytes, real hashes), as tests/server does."""
    members = []
    for i in range(k):
        adir = root / "adapters" / f"m{i}"
        adir.mkdir(parents=True, exist_ok=True)
        (adir / ADAPTER_FILE).write_bytes(f"w{i}".encode())
        (adir / "adapter_config.json").write_text("{}")
        members.append(
            MemberSpec(
                name=f"m{i}",
                adapter=f"adapters/m{i}",
                weight=1 / k,
                sha256=sha256_file(adir / ADAPTER_FILE),
            )
        )
    m = EnsembleManifest(
        name=name,
        base_model="/data/models/base",
        objective="sft",
        alpha=0.8,
        members=members,
        lora=LoraSpec(r=r, alpha=16, target_modules=["q_proj"]),
    )
    m.save(root)
    return m


def run_helper(
    *args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HELPER), *map(str, args)],
        capture_output=True,
        text=True,
        env=env if env is not None else clean_env(),
        cwd=cwd,
        timeout=120,
        check=False,
    )


def helper_lines(*args: str | Path, env: dict[str, str] | None = None) -> list[str]:
    out = run_helper(*args, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


# ---------------------------------------------------------------------------- files


@pytest.mark.parametrize("rel", REQUIRED)
def test_required_file_exists(rel: str) -> None:
    assert (DEPLOY / rel).is_file()


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = load(path)
    assert docs, f"{path} holds no YAML document"
    assert all(isinstance(d, dict) for d in docs)


class _StrictLoader(yaml.SafeLoader):
    """safe_load, except that a repeated mapping key is an error (YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_has_no_duplicate_keys(path: Path) -> None:
    list(
        yaml.load_all(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
    )  # a SafeLoader subclass


def test_kustomization_lists_the_manifests() -> None:
    (kust,) = load(K8S / "kustomization.yaml")
    resources = kust["resources"]
    assert {"vllm.yaml", "embedder.yaml", "gateway.yaml", "configmap.yaml", "pvc.yaml"} <= set(
        resources
    )
    for rel in resources:
        assert (K8S / rel).is_file(), rel
    names = {i["name"] for i in kust.get("images", [])}
    for rel in resources:
        for doc in load(K8S / rel):
            if doc.get("kind") == "Deployment":
                for c in containers(doc):
                    assert c["image"].split(":")[0] in names, f"{rel}: {c['image']} not in images"


# ---------------------------------------------------------------------------- settings


def collected_env() -> dict[str, list[tuple[str, Any]]]:
    """Every environment variable set by compose or Kubernetes, with where and the value."""
    found: dict[str, list[tuple[str, Any]]] = {}

    def add(name: str, where: str, value: Any) -> None:
        found.setdefault(name, []).append((where, value))

    for path, doc in ((COMPOSE, compose()), (COMPOSE_GPU, compose_gpu())):
        for svc_name, svc in doc["services"].items():
            for k, v in env_map(svc.get("environment")).items():
                add(k, f"{path.name}:{svc_name}", compose_default(v))
    for doc in k8s_docs():
        where = f"k8s {doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "ConfigMap":
            for k, v in doc.get("data", {}).items():
                add(k, where, v)
        if doc["kind"] in {"Deployment", "Job"}:
            for c in containers(doc):
                for e in c.get("env", []):
                    add(e["name"], where, e.get("value"))
    return found


def test_every_softspec_env_var_is_a_setting() -> None:
    env = collected_env()
    used = {k for k in env if k.startswith("SOFTSPEC_")}
    assert {"SOFTSPEC_GATE_THRESHOLD", "SOFTSPEC_GATE_ACTION", "SOFTSPEC_API_KEYS"} <= used
    unknown = {k: env[k] for k in used - SETTINGS_ENV}
    assert not unknown, f"not fields of server.settings.Settings: {unknown}"


def test_every_softspec_name_in_deploy_text_is_known() -> None:
    for name, reader in OTHER_ENV.items():
        assert name in reader.read_text(), f"{name} is no longer read by {reader}"
    for path in TEXT_FILES:
        for name in set(re.findall(r"SOFTSPEC_[A-Z0-9_]*[A-Z0-9]", path.read_text())):
            assert name in SETTINGS_ENV | set(OTHER_ENV), f"{path}: unknown {name}"


def test_env_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, places in collected_env().items():
        if not name.startswith("SOFTSPEC_"):
            continue
        for where, value in places:
            if value is None:
                continue  # passed through from the shell only when set
            with monkeypatch.context() as m:
                for k in list(os.environ):
                    if k.startswith("SOFTSPEC_"):
                        m.delenv(k)
                m.setenv(name, str(value))
                try:
                    Settings(ensemble=tmp_path)
                except Exception as exc:  # pragma: no cover - the failure message
                    pytest.fail(f"{where}: {name}={value!r} is rejected: {exc}")


def test_readme_documents_every_setting() -> None:
    text = (DEPLOY / "README.md").read_text()
    missing = sorted(n for n in SETTINGS_ENV if f"`{n}`" not in text)
    assert not missing, f"deploy/README.md does not document {missing}"


def test_compose_and_k8s_share_the_vllm_shaping_settings() -> None:
    """vLLM, the embedder and the gateway must agree on these; all get the same values."""
    shared = ["SOFTSPEC_MAX_MODEL_LEN", "SOFTSPEC_TOP_LOGPROBS"]
    services = compose()["services"]
    vllm_env, gw_env = (env_map(services[s].get("environment")) for s in ("vllm", "gateway"))
    for name in shared:
        assert name in vllm_env and vllm_env[name] == gw_env.get(name), name
    # the embedder's shape (server.vllm_args.ensemble_embedder_args): the context length,
    # the dtype and the base model must be the ones vLLM and the gateway use
    embed_env = env_map(services["embedder"].get("environment"))
    for name in ("SOFTSPEC_MAX_MODEL_LEN", "SOFTSPEC_VLLM_DTYPE", "SOFTSPEC_BASE_MODEL"):
        assert embed_env.get(name) == vllm_env.get(name) == gw_env.get(name), name
    cm_name = k8s_find("ConfigMap", "softspec-config")["metadata"]["name"]
    for dep in ("vllm", "embedder", "softspec-gateway"):
        refs = [
            e["configMapRef"]["name"]
            for e in only_container(k8s_find("Deployment", dep)).get("envFrom", [])
        ]
        assert cm_name in refs, dep
    assert set(shared) <= set(k8s_find("ConfigMap", cm_name)["data"])


# ---------------------------------------------------------------------------- wiring


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_compose_gateway_reaches_the_vllm_service(upstream: str) -> None:
    """The gateway's ``--vllm-url`` / ``--embed-url`` name the service that serves it."""
    services = compose()["services"]
    assert {"vllm", "embedder", "gateway", "prometheus"} <= set(services)
    url, _ = gateway_flags(services["gateway"]["command"], UPSTREAMS[upstream])
    parts = urlsplit(url)
    assert parts.hostname == upstream, url
    assert parts.hostname in services, f"{url}: no compose service {parts.hostname!r}"
    vllm = services[parts.hostname]
    port = helper_port(compose_unescape(vllm["entrypoint"][-1]), upstream == "embedder")
    assert parts.port == port
    assert str(port) in [str(p) for p in vllm.get("expose", [])]
    assert f"127.0.0.1:{port}/health" in " ".join(vllm["healthcheck"]["test"])
    # started, not healthy: the gateway must come up (and report not-ready) without vLLM,
    # or an empty data volume would leave `up` waiting on a vLLM that never gets healthy
    deps = services["gateway"]["depends_on"]
    assert parts.hostname in deps
    if isinstance(deps, dict):
        assert deps[parts.hostname].get("condition") != "service_healthy"


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_k8s_gateway_reaches_the_vllm_service(upstream: str) -> None:
    gw = only_container(k8s_find("Deployment", "softspec-gateway"))
    url, _ = gateway_flags(gw["args"], UPSTREAMS[upstream])
    parts = urlsplit(url)
    assert parts.hostname == upstream, url
    svc = k8s_find("Service", str(parts.hostname))
    (port,) = [p for p in svc["spec"]["ports"] if p["port"] == parts.port]
    dep = k8s_find("Deployment", upstream)
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items(), (
        f"the Service selects no {upstream} pod"
    )
    assert labels["app.kubernetes.io/component"] == upstream
    c = only_container(dep)
    (cport,) = [p for p in c["ports"] if port["targetPort"] in (p.get("name"), p["containerPort"])]
    command = kubelet_unescape(c["command"][-1])
    assert cport["containerPort"] == helper_port(command, upstream == "embedder")


def test_k8s_services_select_their_own_pods() -> None:
    deployments = {d["metadata"]["name"]: d for d in k8s_docs() if d["kind"] == "Deployment"}
    for dep in deployments.values():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for svc in (d for d in k8s_docs() if d["kind"] == "Service"):
        hits = [
            n
            for n, d in deployments.items()
            if svc["spec"]["selector"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(hits) == 1, f"Service {svc['metadata']['name']} selects {hits}"
        assert hits == [svc["metadata"]["name"]], "a Service is named after its Deployment"
    assert deployments["softspec-gateway"]["spec"]["replicas"] == 2


def test_k8s_gateway_port_probes_and_scrape_annotations() -> None:
    dep = k8s_find("Deployment", "softspec-gateway")
    c = only_container(dep)
    _, port = gateway_flags(c["args"])
    ports = {p.get("name"): p["containerPort"] for p in c["ports"]}
    assert port in ports.values()

    def probe_port(probe: dict[str, Any]) -> int:
        if "exec" in probe:
            (url,) = re.findall(r"http://127\.0\.0\.1:(\d+)/", " ".join(probe["exec"]["command"]))
            return int(url)
        p = probe["httpGet"]["port"]
        return int(ports[p]) if isinstance(p, str) else int(p)

    assert probe_port(c["readinessProbe"]) == port
    assert probe_port(c["livenessProbe"]) == port
    assert probe_port(c["startupProbe"]) == port
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == port
    svc = k8s_find("Service", "softspec-gateway")
    assert any(p["targetPort"] in (port, "http") for p in svc["spec"]["ports"])


def test_k8s_volumes_use_the_pvc() -> None:
    pvc = k8s_find("PersistentVolumeClaim", "softspec-data")
    for name in ("vllm", "embedder", "softspec-gateway"):
        spec = k8s_find("Deployment", name)["spec"]["template"]["spec"]
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in spec["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert pvc["metadata"]["name"] in claims.values(), name
        (c,) = spec["containers"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert claims.get(mounts.get("/data", "")) == pvc["metadata"]["name"], name


def test_compose_volume_mounts() -> None:
    doc = compose()
    assert "softspec-data" in doc["volumes"]
    for name in ("vllm", "embedder", "gateway"):
        vols = doc["services"][name]["volumes"]
        assert any(str(v).split(":")[:2] == ["softspec-data", "/data"] for v in vols), name
    for name in UPSTREAMS:  # serving never writes the data volume
        vols = [str(v).split(":") for v in doc["services"][name]["volumes"]]
        assert all(v[-1] == "ro" for v in vols if v[0] == "softspec-data"), name


def test_prometheus_scrapes_the_gateway() -> None:
    (prom,) = load(PROMETHEUS)
    services = compose()["services"]
    _, gw_port = gateway_flags(services["gateway"]["command"])
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    targets = [t for j in jobs.values() for sc in j["static_configs"] for t in sc["targets"]]
    assert f"gateway:{gw_port}" in targets
    for target in targets:
        assert target.partition(":")[0] in services, target
    mounts = [str(v) for v in services["prometheus"]["volumes"]]
    assert any((DEPLOY / m.split(":")[0]).resolve() == PROMETHEUS.resolve() for m in mounts), mounts


# ---------------------------------------------------------------------------- routes


def app_paths() -> tuple[set[str], set[str]]:
    from server.routes import open_router, router

    return {r.path for r in open_router.routes}, {r.path for r in router.routes}  # type: ignore[attr-defined]


def gateway_probe_paths() -> dict[str, str]:
    """Every gateway path something outside polls, by who polls it."""
    paths: dict[str, str] = {}
    services = compose()["services"]
    hc = " ".join(services["gateway"]["healthcheck"]["test"])
    (paths["compose healthcheck"],) = re.findall(r"http://127\.0\.0\.1:\d+(/[\w/]*)", hc)
    dep = k8s_find("Deployment", "softspec-gateway")
    c = only_container(dep)
    (paths["k8s readinessProbe"],) = re.findall(
        r"http://127\.0\.0\.1:\d+(/[\w/]*)", " ".join(c["readinessProbe"]["exec"]["command"])
    )
    paths["k8s startupProbe"] = c["startupProbe"]["httpGet"]["path"]
    paths["k8s livenessProbe"] = c["livenessProbe"]["httpGet"]["path"]
    paths["k8s scrape annotation"] = dep["spec"]["template"]["metadata"]["annotations"][
        "prometheus.io/path"
    ]
    (prom,) = load(PROMETHEUS)
    for job in prom["scrape_configs"]:
        for sc in job["static_configs"]:
            if any(t.startswith("gateway:") for t in sc["targets"]):
                paths["prometheus.yml"] = job.get("metrics_path", "/metrics")
    return paths


def test_probes_hit_gateway_routes() -> None:
    open_paths, keyed_paths = app_paths()
    paths = gateway_probe_paths()
    for who, path in paths.items():
        assert path in open_paths | keyed_paths, f"{who}: {path} is not a gateway route"
    assert paths["k8s readinessProbe"] == "/ready"
    assert paths["k8s livenessProbe"] == paths["k8s startupProbe"] == "/health"
    assert paths["compose healthcheck"] == "/health"
    assert paths["prometheus.yml"] == paths["k8s scrape annotation"] == "/metrics"
    # liveness must not depend on API keys, or enabling auth would restart every pod
    assert "/health" in open_paths


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_vllm_probes_use_vllm_health(upstream: str) -> None:
    c = only_container(k8s_find("Deployment", upstream))
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["path"] == "/health", probe
    assert c["readinessProbe"]["httpGet"]["port"] in ("http", 8000)
    hc = " ".join(compose()["services"][upstream]["healthcheck"]["test"])
    assert re.findall(r"http://127\.0\.0\.1:\d+(/[\w/]*)", hc) == ["/health"]


def test_embedder_mirrors_vllm() -> None:
    """The embedder runs like vLLM (image, settings, CPU KV cache, NUMA binding, restarts)
    but is the base model only: less memory. Both need more /dev/shm than Docker's 64 MB
    (vLLM's executor puts a 160 MiB message queue there; the embedder died on it)."""
    services = compose()["services"]
    vllm, emb = services["vllm"], services["embedder"]
    for key in ("image", "pull_policy", "restart", "cap_add", "expose"):
        assert emb.get(key) == vllm.get(key), key
    vllm_env, emb_env = env_map(vllm["environment"]), env_map(emb["environment"])
    assert emb_env.get("VLLM_CPU_KVCACHE_SPACE") == vllm_env["VLLM_CPU_KVCACHE_SPACE"]
    assert sorted(map(str, emb["volumes"])) == sorted(map(str, vllm["volumes"]))
    k_vllm = only_container(k8s_find("Deployment", "vllm"))
    k_emb = only_container(k8s_find("Deployment", "embedder"))
    for key in ("image", "imagePullPolicy", "envFrom", "env", "ports"):
        assert k_emb.get(key) == k_vllm.get(key), key

    def mib(size: str) -> float:
        units = {"mb": 1.0, "gb": 1024.0, "Mi": 1.0, "Gi": 1024.0}
        return float(size[:-2]) * units[size[-2:]]

    assert mib(str(emb["shm_size"])) >= 256 and mib(str(vllm["shm_size"])) >= 256
    for dep in ("vllm", "embedder"):
        pod = k8s_find("Deployment", dep)["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        (shm,) = [m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        (vol,) = [v for v in pod["volumes"] if v["name"] == shm]
        assert vol["emptyDir"]["medium"] == "Memory", dep
        assert mib(vol["emptyDir"]["sizeLimit"]) >= 256, dep

    def gib(q: str) -> float:
        units = {"Mi": 1 / 1024, "Gi": 1.0}
        return float(q[:-2]) * units[q[-2:]]

    for kind in ("requests", "limits"):
        e, v = k_emb["resources"][kind]["memory"], k_vllm["resources"][kind]["memory"]
        assert gib(e) < gib(v), (kind, e, v)


# ---------------------------------------------------------------------------- vllm-args.py


@pytest.fixture
def ensemble_dir(tmp_path: Path) -> tuple[Path, EnsembleManifest]:
    root = tmp_path / "ensemble"
    return root, make_ensemble(root, k=3, r=12)


def test_helper_prints_the_lora_arguments(ensemble_dir: tuple[Path, EnsembleManifest]) -> None:
    root, manifest = ensemble_dir
    args = helper_lines(root)
    assert "--enable-lora" in args
    assert int(flag(args, "--max-loras")) == len(manifest.members) == 3
    assert int(flag(args, "--max-lora-rank")) >= manifest.lora.r
    start = args.index("--lora-modules") + 1
    modules = dict(a.split("=", 1) for a in args[start : start + len(manifest.members)])
    for m in manifest.member_names:
        assert Path(modules[manifest.served_name(m)]) == (root / "adapters" / m).resolve()
    assert flag(args, "--model") == "/data/models/base"
    assert (flag(args, "--host"), flag(args, "--port")) == ("0.0.0.0", "8000")
    assert flag(args, "--max-logprobs") == "20"
    assert flag(args, "--max-model-len") == "2048"
    assert "--enable-prefix-caching" in args


def test_helper_matches_what_softspec_serve_would_start(
    ensemble_dir: tuple[Path, EnsembleManifest], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ensemble import manifest as manifest_io
    from server.launch import vllm_process

    root, _ = ensemble_dir
    for k in list(os.environ):
        if k.startswith("SOFTSPEC_"):
            monkeypatch.delenv(k)
    proc = vllm_process(Settings(ensemble=root), manifest_io.load(root))
    proc.host, proc.port = "0.0.0.0", 8123
    cmd = proc.command()
    assert cmd[1:3] == ["-m", VLLM_MODULE]
    assert helper_lines(root, "--port", "8123") == cmd[3:]


def test_helper_embedder_matches_what_softspec_serve_would_start(
    ensemble_dir: tuple[Path, EnsembleManifest], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--embedder``: the builder's list, which is the one `softspec serve` gives its own
    embedder child: the base model as a pooling server, no adapters."""
    from ensemble import manifest as manifest_io
    from server.launch import embedder_process
    from server.vllm_args import EMBEDDER_POOLER, VLLMShape, ensemble_embedder_args

    root, manifest = ensemble_dir
    for k in list(os.environ):
        if k.startswith("SOFTSPEC_"):
            monkeypatch.delenv(k)
    args = helper_lines(root, "--embedder", "--port", "8123")
    assert args == ensemble_embedder_args(root, manifest, VLLMShape(), "0.0.0.0", 8123)
    proc = embedder_process(Settings(ensemble=root), manifest_io.load(root))
    proc.host, proc.port = "0.0.0.0", 8123
    cmd = proc.command()
    assert cmd[1:3] == ["-m", VLLM_MODULE]
    assert args == cmd[3:]
    assert flag(args, "--model") == "/data/models/base"
    assert (flag(args, "--host"), flag(args, "--port")) == ("0.0.0.0", "8123")
    assert (flag(args, "--runner"), flag(args, "--convert")) == ("pooling", "embed")
    assert flag(args, "--pooler-config") == EMBEDDER_POOLER
    assert "--enable-lora" not in args and "--lora-modules" not in args
    assert helper_lines(root) != args  # without --embedder: the generating server's list


SETTING_CASES = {
    "defaults": {},
    "overrides": {
        "SOFTSPEC_MAX_MODEL_LEN": "1024",
        "SOFTSPEC_TOP_LOGPROBS": "5",
        "SOFTSPEC_VLLM_DTYPE": "bfloat16",
        "SOFTSPEC_VLLM_ARGS": "--seed 7,--max-num-seqs 16",
        "SOFTSPEC_BASE_MODEL": "/data/models/other",
    },
}


@pytest.mark.parametrize("case", SETTING_CASES)
def test_helper_reads_the_vllm_shaping_settings(
    case: str, ensemble_dir: tuple[Path, EnsembleManifest], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The helper (environment only) and `softspec serve` (Settings) give the same list."""
    from ensemble import manifest as manifest_io
    from server.launch import vllm_process

    root, _ = ensemble_dir
    env = clean_env(**SETTING_CASES[case])
    full = helper_lines(root, env=env)
    for k in list(os.environ):
        if k.startswith("SOFTSPEC_"):
            monkeypatch.delenv(k)
    for k, v in SETTING_CASES[case].items():
        monkeypatch.setenv(k, v)
    proc = vllm_process(Settings(ensemble=root), manifest_io.load(root))  # type: ignore[call-arg]
    proc.host, proc.port = "0.0.0.0", 8000
    assert proc.command()[3:] == full
    if case == "overrides":
        assert flag(full, "--max-model-len") == "1024"
        assert flag(full, "--max-logprobs") == "5"
        assert flag(full, "--dtype") == "bfloat16"
        assert flag(full, "--model") == "/data/models/other"
        assert full[-4:] == ["--seed", "7", "--max-num-seqs", "16"]


@pytest.mark.parametrize("case", SETTING_CASES)
def test_helper_embedder_reads_the_shaping_settings(
    case: str, ensemble_dir: tuple[Path, EnsembleManifest], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--embedder`` (environment only) and `softspec serve`'s embedder child (Settings)
    give the same list: the same base model, context length and dtype as vLLM."""
    from ensemble import manifest as manifest_io
    from server.launch import embedder_process

    root, _ = ensemble_dir
    env = clean_env(**SETTING_CASES[case])
    emb = helper_lines(root, "--embedder", env=env)
    for k in list(os.environ):
        if k.startswith("SOFTSPEC_"):
            monkeypatch.delenv(k)
    for k, v in SETTING_CASES[case].items():
        monkeypatch.setenv(k, v)
    proc = embedder_process(Settings(ensemble=root), manifest_io.load(root))  # type: ignore[call-arg]
    proc.host, proc.port = "0.0.0.0", 8000
    assert proc.command()[3:] == emb
    vllm = helper_lines(root, env=env)
    for name in ("--model", "--max-model-len", "--dtype"):
        assert flag(emb, name) == flag(vllm, name), name
    if case == "overrides":
        assert flag(emb, "--model") == "/data/models/other"
        assert "--seed" not in emb  # SOFTSPEC_VLLM_ARGS are the generating server's


def test_helper_without_the_server_package_says_what_to_mount(
    ensemble_dir: tuple[Path, EnsembleManifest],
) -> None:
    root, _ = ensemble_dir
    code = (
        "import runpy, sys; sys.modules['server'] = None; "
        f"sys.argv = ['vllm-args', {str(root)!r}]; "
        f"runpy.run_path({str(HELPER)!r}, run_name='__main__')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), check=False
    )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("vllm-args: error:") and "server/" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_helper_runs_from_any_directory(
    ensemble_dir: tuple[Path, EnsembleManifest], tmp_path: Path
) -> None:
    root, _ = ensemble_dir
    out = run_helper(root, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "--enable-lora" in out.stdout.splitlines()


def test_helper_errors_are_one_line_and_print_no_arguments(tmp_path: Path) -> None:
    missing = run_helper(tmp_path / "nowhere")
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.startswith("vllm-args: error:") and "ensemble.json" in missing.stderr

    root = tmp_path / "tampered"
    make_ensemble(root)
    (root / "adapters" / "m1" / ADAPTER_FILE).write_bytes(b"changed")
    bad = run_helper(root)
    assert bad.returncode == 2 and bad.stdout == ""
    assert "member m1" in bad.stderr and "Traceback" not in bad.stderr

    spaced = tmp_path / "with space"
    make_ensemble(spaced)
    split = run_helper(spaced)
    assert split.returncode == 2 and split.stdout == ""
    assert "whitespace" in split.stderr


def test_helper_rejects_bad_settings(ensemble_dir: tuple[Path, EnsembleManifest]) -> None:
    root, _ = ensemble_dir
    out = run_helper(root, env=clean_env(SOFTSPEC_MAX_MODEL_LEN="8"))
    assert out.returncode == 2 and out.stdout == ""
    assert "SOFTSPEC_MAX_MODEL_LEN" in out.stderr


# ---------------------------------------------------------------------------- start-up line


def vllm_scripts(upstream: str = "vllm") -> dict[str, str]:
    """The vLLM (or embedder) containers' shell lines as the shell receives them."""
    services = compose()["services"]
    entry = services[upstream]["entrypoint"]
    assert entry[:2] == ["sh", "-c"], entry
    cmd = only_container(k8s_find("Deployment", upstream))["command"]
    assert cmd[:2] == ["sh", "-c"], cmd
    return {"compose": compose_unescape(entry[2]), "k8s": kubelet_unescape(cmd[2])}


@pytest.fixture
def fake_python(tmp_path: Path) -> tuple[Path, Path]:
    """A ``python``/``python3`` that records ``-m vllm...`` calls and runs everything else."""
    bindir, record = tmp_path / "bin", tmp_path / "vllm-argv.txt"
    bindir.mkdir()
    shim = (
        "#!/bin/sh\n"
        'if [ "$1" = "-m" ]; then printf \'%s\\n\' "$@" > "$VLLM_ARGV_OUT"; exit 0; fi\n'
        f'exec {shlex.quote(sys.executable)} "$@"\n'
    )
    for name in ("python", "python3"):
        (bindir / name).write_text(shim)
        (bindir / name).chmod(0o755)
    return bindir, record


def run_script(
    script: str, root: Path, bindir: Path, record: Path
) -> subprocess.CompletedProcess[str]:
    assert IMAGE_HELPER in script and IMAGE_ENSEMBLE in script
    local = script.replace(IMAGE_HELPER, str(HELPER)).replace(IMAGE_ENSEMBLE, str(root))
    env = clean_env(PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", VLLM_ARGV_OUT=str(record))
    return subprocess.run(
        ["sh", "-c", local], capture_output=True, text=True, env=env, timeout=120, check=False
    )


@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_startup_line_execs_vllm_with_the_helper_arguments(
    where: str,
    upstream: str,
    ensemble_dir: tuple[Path, EnsembleManifest],
    fake_python: tuple[Path, Path],
) -> None:
    root, _ = ensemble_dir
    bindir, record = fake_python
    out = run_script(vllm_scripts(upstream)[where], root, bindir, record)
    assert out.returncode == 0, out.stderr
    argv = record.read_text().splitlines()
    assert argv[:2] == ["-m", VLLM_MODULE]
    extra = ["--embedder"] if upstream == "embedder" else []
    assert argv[2:] == helper_lines(root, *extra)
    if upstream == "embedder":  # one argument, not split by the shell
        assert flag(argv, "--pooler-config").startswith("{") and "--enable-lora" not in argv


@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_startup_line_stops_when_the_helper_fails(
    where: str, upstream: str, tmp_path: Path, fake_python: tuple[Path, Path]
) -> None:
    bindir, record = fake_python
    out = run_script(vllm_scripts(upstream)[where], tmp_path / "no-ensemble", bindir, record)
    assert out.returncode != 0
    assert "vllm-args: error:" in out.stderr
    assert not record.exists(), "vLLM was started without the ensemble's arguments"


def test_compose_has_no_accidental_interpolation() -> None:
    for path in (COMPOSE, COMPOSE_GPU):
        for s in strings(load(path)):
            rest = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:?[-?+][^}]*)?\}", "", s.replace("$$", ""))
            assert "$" not in rest, f"{path.name}: {s!r}"


# ---------------------------------------------------------------------------- images


def dockerfile_instructions() -> list[tuple[str, list[str]]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), shlex.split(rest)))
    return out


def dockerfile_stages() -> dict[str, list[tuple[str, list[str]]]]:
    """Instructions per stage, in file order; the key is the stage name (``FROM x AS name``)."""
    stages: dict[str, list[tuple[str, list[str]]]] = {}
    current: list[tuple[str, list[str]]] | None = None
    for op, args in dockerfile_instructions():
        if op == "FROM":
            assert len(args) == 3 and args[1].upper() == "AS", f"unnamed stage: FROM {args}"
            current = stages[args[2]] = [(op, args)]
        elif current is not None:
            current.append((op, args))
    return stages


def dockerfile_arg_defaults() -> dict[str, str]:
    out = {}
    for op, args in dockerfile_instructions():
        if op == "ARG" and "=" in args[0]:
            k, _, v = args[0].partition("=")
            out[k] = v
    return out


def stage_parents(stages: dict[str, list[tuple[str, list[str]]]], name: str) -> list[str]:
    """The stage chain a target needs: its FROM ancestors and COPY --from sources."""
    need, todo = [], [name]
    while todo:
        n = todo.pop()
        if n in need or n not in stages:
            continue
        need.append(n)
        for op, args in stages[n]:
            if op == "FROM":
                todo.append(args[0])
            if op == "COPY":
                todo += [a.split("=", 1)[1] for a in args if a.startswith("--from=")]
    return need


def pip_installs(stage: list[tuple[str, list[str]]]) -> list[str]:
    """The project extras a stage's RUN lines install: ``.[serve]`` or ``<wheel>[serve]``."""
    found = []
    for op, args in stage:
        if op == "RUN":
            found += re.findall(r"(?:\s\.|\.whl\))\[([\w,]+)\]", " " + " ".join(args))
    return found


def builds_project(stage: list[tuple[str, list[str]]]) -> bool:
    """The stage builds the project from source (``pip wheel .`` / ``pip install .``)."""
    runs = " ".join(" ".join(args) for op, args in stage if op == "RUN")
    return bool(re.search(r"pip (wheel|install)\b[^&;]*\s\.(\[|\s|$)", runs))


def test_dockerfile_copies_existing_files_and_every_package() -> None:
    stages = dockerfile_stages()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    builders = [n for n, st in stages.items() if builds_project(st)]
    assert builders, "no stage installs the project"
    for name, stage in stages.items():
        sources: set[str] = set()
        for op, args in stage:
            if op not in {"COPY", "ADD"} or any(a.startswith("--from=") for a in args):
                continue
            for src in [a for a in args if not a.startswith("--")][:-1]:
                assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
                sources.add(src.rstrip("/"))
        if name in builders:
            assert "pyproject.toml" in sources, name
            missing = packages - sources
            assert not missing, f"{name}: `pip install .` needs {missing}, which it does not copy"
    # vllm-args.py and populate.sh live in /app/deploy of both images
    runtime = stages["runtime"]
    (workdir,) = [args[0] for op, args in runtime if op == "WORKDIR"]
    assert workdir == str(Path(IMAGE_HELPER).parent.parent)  # vllm-args.py's root
    copied = [a for op, args in runtime if op == "COPY" for a in args]
    assert {"deploy/vllm-args.py", "deploy/populate.sh"} <= set(copied)
    assert copied[-1] == "deploy/"
    for target in ("gateway", "full"):
        assert "runtime" in stage_parents(stages, target), target


def test_dockerfile_targets_and_the_lean_gateway() -> None:
    stages = dockerfile_stages()
    names = list(stages)
    assert names[-1] == "full", "the default target (last stage) is the full image"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    gateway_chain = stage_parents(stages, "gateway")
    assert "full-build" not in gateway_chain
    installs = [x for n in gateway_chain for x in pip_installs(stages[n])]
    assert installs == ["serve"], installs
    heavy = re.compile(r"^(torch|transformers|vllm|peft|accelerate)\b")
    assert not [r for r in extras["serve"] if heavy.match(r)], extras["serve"]
    # the classic builder (no BuildKit) builds every stage before the target in file order:
    # the gateway's stages must all come before the full image's build stage
    assert max(names.index(n) for n in gateway_chain) < names.index("full-build")
    full_installs = [x for n in stage_parents(stages, "full") for x in pip_installs(stages[n])]
    assert "serve,train" in full_installs
    # deploy/local/ (CA certificates, wheels) reaches build stages only, never an image
    for target in ("gateway", "full"):
        for n in stage_parents(stages, target):
            copies_local = any(
                op == "COPY" and "deploy/local/" in args and not args[0].startswith("--from=")
                for op, args in stages[n]
            )
            assert not copies_local or n.endswith("build") or n == "pip-base", n
        # the final stages only copy the built virtual environment
        assert [op for op, _ in stages[target][1:]] == ["COPY"], stages[target]


def test_the_full_image_can_compile_what_vllm_compiles_on_cpu() -> None:
    """vLLM on CPU runs torch.compile (inductor) on the first generate: without a C++
    compiler and Python's headers in the image its engine core dies on the first request
    (what `make deploy-test` hit). The vLLM image's runtime stage installs both."""
    stages = dockerfile_stages()
    runs = " ".join(a for n in stage_parents(stages, "full") for op, args in stages[n]
                    if op == "RUN" for a in args)  # fmt: skip
    assert re.search(r"\bg\+\+", runs), "no C++ compiler in the full image"
    assert "python3-dev" in runs and "Python.h" in runs, "Python's headers are not ensured"
    gateway = " ".join(a for n in stage_parents(stages, "gateway") for op, args in stages[n]
                       if op == "RUN" for a in args)  # fmt: skip
    assert "g++" not in gateway, "the lean gateway image needs no compiler"


def test_local_build_files_stay_out_of_git() -> None:
    ignore = (DEPLOY / "local" / ".gitignore").read_text().split()
    assert ignore[0] == "*" and set(ignore[1:]) <= {"!.gitignore", "!README.md"}
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return
    for name in ("host-ca-certificates.crt", "torch-2.13.0+cpu-cp311-cp311-any.whl"):
        out = subprocess.run(
            ["git", "check-ignore", "-q", f"deploy/local/{name}"], cwd=REPO, check=False
        )
        assert out.returncode == 0, f"deploy/local/{name} is not git-ignored"
    dockerignore = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in dockerignore and ".git" in dockerignore


def test_compose_build_args_match_the_dockerfile() -> None:
    defaults = dockerfile_arg_defaults()
    stages = dockerfile_stages()
    services = compose()["services"]
    builds = {n: s["build"] for n, s in services.items() if "build" in s}
    assert {b["target"] for b in builds.values()} == {"gateway", "full"}
    for name, b in builds.items():
        assert b["target"] in stages, name
        for arg, value in b.get("args", {}).items():
            assert arg in defaults, f"{name}: build arg {arg} is not an ARG of the Dockerfile"
            assert compose_default(value) == defaults[arg], (name, arg)
    images = {b["target"]: services[n]["image"] for n, b in builds.items()}
    assert services["vllm"]["image"] == services["populate"]["image"] == images["full"]
    assert services["embedder"]["image"] == images["full"]
    assert services["gateway"]["image"] == images["gateway"]


def test_compose_file_works_with_compose_v1() -> None:
    """Compose v1.29 (Debian's) rejects keys v2 added, e.g. a top-level ``name:``."""
    top = set(compose()) | set(compose_gpu())
    allowed = {"services", "volumes", "networks", "configs", "secrets"}
    assert {k for k in top if not k.startswith("x-")} <= allowed, top
    assert "version" not in top  # v2 warns on it; v1.29 does not need it
    for doc in (compose(), compose_gpu()):
        for vol in (doc.get("volumes") or {}).values():
            # a fixed volume name would be shared (and `down -v`-ed) by every project
            assert not (vol or {}).get("name"), vol


@pytest.mark.parametrize("cmd", [["docker-compose"], ["docker", "compose"]], ids=["v1", "v2"])
def test_compose_config_is_accepted(cmd: list[str], tmp_path: Path) -> None:
    if shutil.which(cmd[0]) is None:
        pytest.skip(f"{' '.join(cmd)} is not installed")
    if len(cmd) == 2:
        probe = subprocess.run([*cmd, "version"], capture_output=True, check=False)
        if probe.returncode != 0:
            pytest.skip("docker compose (v2) is not installed")
    for files in ([COMPOSE], [COMPOSE, COMPOSE_GPU]):
        args = [a for f in files for a in ("-f", str(f))]
        out = subprocess.run(
            [*cmd, *args, "--profile", "tools", "--profile", "monitoring", "config", "-q"],
            capture_output=True, text=True, cwd=tmp_path, env=clean_env(), timeout=60,
            check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr


def test_compose_builds_the_repository_dockerfile() -> None:
    services = compose()["services"]
    builds = [s["build"] for s in services.values() if "build" in s]
    assert builds
    for b in builds:
        assert (DEPLOY / b["context"]).resolve() == REPO
        assert (DEPLOY / b["context"] / b.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    built = {s["image"] for s in services.values() if "build" in s}
    for name in UPSTREAMS:
        assert services[name]["image"] in built, f"{name} must run the image compose builds"
        # no build: the GPU override swaps the image, which must not get our build tagged on it
        assert "build" not in services[name]


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_helper_is_in_the_compose_vllm_container(upstream: str) -> None:
    copied = any(
        op in {"COPY", "ADD"}
        and any(a.rstrip("/") in {"deploy", "deploy/vllm-args.py"} for a in args)
        for op, args in dockerfile_instructions()
    )
    mounts = [str(v).split(":") for v in compose()["services"][upstream].get("volumes", [])]
    mounted = any(
        len(m) >= 2 and m[1] == IMAGE_HELPER and (DEPLOY / m[0]).resolve() == HELPER for m in mounts
    )
    assert copied or mounted


def test_gpu_override() -> None:
    vllm = compose_gpu()["services"]["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    assert vllm.get("pull_policy") != "never"
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    # the stock image has no softspec: vllm-args.py needs ensemble/ and server/ next to it
    mounts = [str(v).split(":") for v in vllm.get("volumes", [])]
    for pkg in ("ensemble", "server"):
        inside = Path(IMAGE_HELPER).parent.parent / pkg
        assert any(m[1] == str(inside) and (DEPLOY / m[0]).resolve() == REPO / pkg for m in mounts)
    assert "entrypoint" not in vllm, "the base start-up line (python3, set -e) must apply"
    # The embedder is not overridden: it stays on the CPU image, which has the softspec
    # plugin and the helper's packages (two vLLM servers on one GPU would each claim most of
    # its memory). Should the override move it, it needs what vllm gets above.
    base = compose()["services"]
    embedder = compose_gpu()["services"].get("embedder")
    if embedder is None:
        assert base["embedder"]["image"] == base["populate"]["image"]  # softspec:local
    else:  # pragma: no cover - not the layout today
        assert embedder["image"] == vllm["image"] and "entrypoint" not in embedder
        assert [str(v) for v in embedder.get("volumes", [])] == [str(v) for v in vllm["volumes"]]


# ---------------------------------------------------------------------------- data volume

FILL_HINTS = {
    "compose": "docker compose -f deploy/compose.yaml run --rm populate",
    "k8s": "kubectl apply -f deploy/k8s/populate-job.yaml",
}


def fake_softspec(tmp_path: Path) -> tuple[Path, Path]:
    """A ``softspec`` on PATH that appends its argv (one call per line) to a file."""
    bindir, record = tmp_path / "fakebin", tmp_path / "softspec-calls.txt"
    bindir.mkdir()
    (bindir / "softspec").write_text(f'#!/bin/sh\necho "$*" >> {shlex.quote(str(record))}\n')
    (bindir / "softspec").chmod(0o755)
    return bindir, record


def gateway_start() -> dict[str, tuple[list[str], list[str]]]:
    """The gateway containers' start-up: (entrypoint/command, command/args) as the shell gets them."""
    gw = compose()["services"]["gateway"]
    k8s = only_container(k8s_find("Deployment", "softspec-gateway"))
    entry = [compose_unescape(a) for a in gw["entrypoint"]]
    return {"compose": (entry, list(gw["command"])), "k8s": (k8s["command"], list(k8s["args"]))}


@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_gateway_waits_for_the_data_volume(where: str, tmp_path: Path) -> None:
    """Empty volume: one line naming the fill command, then a wait (no exit, no loop)."""
    entry, cmd = gateway_start()[where]
    assert entry[:2] == ["sh", "-c"] and cmd[0] == "serve"
    root = tmp_path / "ensemble"
    script = entry[2].replace(IMAGE_ENSEMBLE, str(root))
    bindir, record = fake_softspec(tmp_path)
    env = clean_env(PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.Popen(
        ["sh", "-c", script, *entry[3:], *cmd], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        time.sleep(2)
        assert proc.poll() is None, "the gateway start-up exited on an empty volume"
        assert not record.exists()
        root.mkdir()
        (root / "ensemble.json").write_text("{}")
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0
    (line,) = out.splitlines()
    assert FILL_HINTS[where] in line
    assert record.read_text().split() == cmd  # `exec softspec "$@"`: the command, unchanged


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_vllm_names_the_fill_command(upstream: str, tmp_path: Path) -> None:
    extra = ["--embedder"] if upstream == "embedder" else []
    out = run_helper(tmp_path / "empty", *extra)
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1
    for hint in FILL_HINTS.values():
        assert hint in out.stderr
    assert "populate" in compose()["services"]


def test_populate_script(tmp_path: Path) -> None:
    populate = DEPLOY / "populate.sh"
    assert os.access(populate, os.X_OK)
    in_image = str(Path(IMAGE_HELPER).parent / populate.name)
    assert compose()["services"]["populate"]["entrypoint"] == [in_image]
    job = only_container(load(K8S / "populate-job.yaml")[0])
    assert job["command"] == [in_image]
    bindir, record = fake_softspec(tmp_path)
    env = clean_env(PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run(
        [str(populate), "--members", "2", "--max-steps", "2"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    calls = record.read_text().splitlines()
    assert calls[0].startswith("model export-default --out /data/models/")
    assert calls[1] == "data build"
    train = calls[2].split()
    assert train[:2] == ["train", "sft"] and flag(train, "--out") == IMAGE_ENSEMBLE
    assert flag(train, "--base") == flag(calls[0].split(), "--out")
    assert train[-4:] == ["--members", "2", "--max-steps", "2"]  # the last one wins
    # what it writes is what the serving side reads
    assert "/data/data/sft_topics_train.jsonl" in train


# ---------------------------------------------------------------------------- kubernetes


class _ReadyHandler(http.server.BaseHTTPRequestHandler):
    key: str | None = None

    def do_GET(self) -> None:
        wanted = None if self.key is None else f"Bearer {self.key}"
        ok = self.path == "/ready" and self.headers.get("Authorization") == wanted
        self.send_response(200 if ok else 401)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize(
    ("server_key", "env_keys", "ready"),
    [(None, "", True), ("k1", "k1,k2", True), ("k1", "", False), ("k1", "other", False)],
)
def test_k8s_readiness_probe_works_with_api_keys(
    server_key: str | None, env_keys: str, ready: bool
) -> None:
    c = only_container(k8s_find("Deployment", "softspec-gateway"))
    command = c["readinessProbe"]["exec"]["command"]
    handler = type("H", (_ReadyHandler,), {"key": server_key})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        local = [a.replace("127.0.0.1:8080", f"127.0.0.1:{port}") for a in command]
        assert local != command
        if local[0] == "python3":
            local[0] = sys.executable
        out = subprocess.run(
            local, capture_output=True, env=clean_env(SOFTSPEC_API_KEYS=env_keys), timeout=30,
            check=False,
        )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    assert (out.returncode == 0) is ready, out.stderr


def test_k8s_resources_and_replicas() -> None:
    deployments = {d["metadata"]["name"]: d for d in k8s_docs() if d["kind"] == "Deployment"}
    for name, dep in deployments.items():
        for c in containers(dep):
            req = c.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= set(req), f"{name}/{c['name']}: no resource requests"
    job = only_container(load(K8S / "populate-job.yaml")[0])
    assert {"cpu", "memory"} <= set(job["resources"]["requests"])
    (kust,) = load(K8S / "kustomization.yaml")
    counts = {r["name"]: r["count"] for r in kust["replicas"]}
    assert set(counts) == set(deployments), counts
    for name, n in counts.items():
        assert n == deployments[name]["spec"]["replicas"], name
    assert "N vLLM replicas" in (DEPLOY / "README.md").read_text()


# ---------------------------------------------------------------------------- escalation


def test_optional_fallback_service_serves_what_the_gateway_escalates_to(
    fake_python: tuple[Path, Path],
) -> None:
    services = compose()["services"]
    fallback = services["fallback"]
    assert fallback["profiles"] == ["fallback"]  # optional: `--profile fallback`
    assert "softspec-data:/data:ro" in fallback["volumes"]
    gw_env = services["gateway"]["environment"]
    for name in ("URL", "MODEL", "API_KEY", "TIMEOUT", "ON_ERROR"):
        assert f"SOFTSPEC_FALLBACK_{name}" in gw_env  # passed through when set
    # the URL the comment tells users to set reaches this service's vLLM port
    text = COMPOSE.read_text()
    (url,) = set(re.findall(r"SOFTSPEC_FALLBACK_URL=(\S+)", text))
    parts = urlsplit(url)
    assert parts.hostname == "fallback" and parts.path == "/v1"
    assert str(parts.port) in [str(p) for p in fallback["expose"]]
    # the start-up line runs vLLM's OpenAI server on that port with the configured model
    bindir, record = fake_python
    entry = fallback["entrypoint"]
    assert entry[:2] == ["sh", "-c"]
    env = clean_env(
        PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}",
        VLLM_ARGV_OUT=str(record),
        FALLBACK_MODEL_PATH="/data/models/big",
    )
    out = subprocess.run(
        ["sh", "-c", compose_unescape(entry[2])], capture_output=True, text=True, env=env,
        timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    argv = record.read_text().splitlines()
    assert argv[:2] == ["-m", VLLM_MODULE]
    assert flag(argv, "--model") == "/data/models/big"
    assert flag(argv, "--port") == str(parts.port)
    model = fallback["environment"]["FALLBACK_MODEL_PATH"]
    assert model.endswith(":-/data/models/smollm2-135m-instruct}")
    assert "MODEL=/data/models/smollm2-135m-instruct" in (DEPLOY / "populate.sh").read_text()
