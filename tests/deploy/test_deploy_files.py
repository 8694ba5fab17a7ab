"""Static checks of deploy/: compose, Kubernetes, Prometheus, the Dockerfile, vllm-args.py.

No Docker engine or cluster is needed: the files are parsed and cross-checked against the
code they drive (settings, routes, the vLLM arguments the gateway would use), and the vLLM
start-up shell line is run with a stand-in for vLLM.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
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

REQUIRED = [
    "compose.yaml",
    "compose.gpu.yaml",
    "prometheus.yml",
    "vllm-args.py",
    "README.md",
    "k8s/vllm.yaml",
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


def helper_port(script: str) -> int:
    """The vLLM port: the ``--port`` the start-up line gives vllm-args.py (or its default)."""
    words = shlex.split(script.replace(";", " ; "))
    start = words.index(IMAGE_HELPER) + 1
    end = next((i for i in range(start, len(words)) if words[i].endswith(")")), len(words))
    args = [w.rstrip(")") for w in words[start : end + 1]]
    ns = helper_module().build_parser().parse_args(args)
    assert Path(ns.ensemble) == Path(IMAGE_ENSEMBLE)
    return int(ns.port)


def gateway_flags(argv: list[str]) -> tuple[str, int]:
    """``--vllm-url`` and ``--port`` of a ``softspec serve`` command line."""
    assert argv[0] == "serve", argv
    return flag(argv, "--vllm-url"), int(flag(argv, "--port"))


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
    assert {"vllm.yaml", "gateway.yaml", "configmap.yaml", "pvc.yaml"} <= set(resources)
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
    """vLLM and the gateway must agree on these; both services get the same values."""
    shared = ["SOFTSPEC_MAX_MODEL_LEN", "SOFTSPEC_TOP_LOGPROBS"]
    services = compose()["services"]
    vllm_env, gw_env = (env_map(services[s].get("environment")) for s in ("vllm", "gateway"))
    for name in shared:
        assert name in vllm_env and vllm_env[name] == gw_env.get(name), name
    cm_name = k8s_find("ConfigMap", "softspec-config")["metadata"]["name"]
    for dep in ("vllm", "softspec-gateway"):
        refs = [
            e["configMapRef"]["name"]
            for e in only_container(k8s_find("Deployment", dep)).get("envFrom", [])
        ]
        assert cm_name in refs, dep
    assert set(shared) <= set(k8s_find("ConfigMap", cm_name)["data"])


# ---------------------------------------------------------------------------- wiring


def test_compose_gateway_reaches_the_vllm_service() -> None:
    services = compose()["services"]
    assert {"vllm", "gateway", "prometheus"} <= set(services)
    url, _ = gateway_flags(services["gateway"]["command"])
    parts = urlsplit(url)
    assert parts.hostname in services, f"{url}: no compose service {parts.hostname!r}"
    vllm = services[parts.hostname]
    port = helper_port(compose_unescape(vllm["entrypoint"][-1]))
    assert parts.port == port
    assert str(port) in [str(p) for p in vllm.get("expose", [])]
    assert f"127.0.0.1:{port}/health" in " ".join(vllm["healthcheck"]["test"])
    dep = services["gateway"]["depends_on"][parts.hostname]
    assert dep["condition"] == "service_healthy"


def test_k8s_gateway_reaches_the_vllm_service() -> None:
    gw = only_container(k8s_find("Deployment", "softspec-gateway"))
    url, _ = gateway_flags(gw["args"])
    parts = urlsplit(url)
    svc = k8s_find("Service", str(parts.hostname))
    (port,) = [p for p in svc["spec"]["ports"] if p["port"] == parts.port]
    dep = k8s_find("Deployment", "vllm")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items(), "the Service selects no vLLM pod"
    c = only_container(dep)
    (cport,) = [p for p in c["ports"] if port["targetPort"] in (p.get("name"), p["containerPort"])]
    assert cport["containerPort"] == helper_port(kubelet_unescape(c["command"][-1]))


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
    assert deployments["softspec-gateway"]["spec"]["replicas"] == 2


def test_k8s_gateway_port_probes_and_scrape_annotations() -> None:
    dep = k8s_find("Deployment", "softspec-gateway")
    c = only_container(dep)
    _, port = gateway_flags(c["args"])
    ports = {p.get("name"): p["containerPort"] for p in c["ports"]}
    assert port in ports.values()

    def probe_port(probe: dict[str, Any]) -> int:
        p = probe["httpGet"]["port"]
        return int(ports[p]) if isinstance(p, str) else int(p)

    assert probe_port(c["readinessProbe"]) == port
    assert probe_port(c["livenessProbe"]) == port
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == port
    svc = k8s_find("Service", "softspec-gateway")
    assert any(p["targetPort"] in (port, "http") for p in svc["spec"]["ports"])


def test_k8s_volumes_use_the_pvc() -> None:
    pvc = k8s_find("PersistentVolumeClaim", "softspec-data")
    for name in ("vllm", "softspec-gateway"):
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
    for name in ("vllm", "gateway"):
        vols = doc["services"][name]["volumes"]
        assert any(str(v).split(":")[:2] == ["softspec-data", "/data"] for v in vols), name


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
    paths["k8s readinessProbe"] = c["readinessProbe"]["httpGet"]["path"]
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
    assert paths["k8s livenessProbe"] == "/health"
    assert paths["compose healthcheck"] == "/health"
    assert paths["prometheus.yml"] == paths["k8s scrape annotation"] == "/metrics"
    # liveness must not depend on API keys, or enabling auth would restart every pod
    assert "/health" in open_paths


def test_vllm_probes_use_vllm_health() -> None:
    c = only_container(k8s_find("Deployment", "vllm"))
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["path"] == "/health", probe
    assert c["readinessProbe"]["httpGet"]["port"] in ("http", 8000)


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
def test_standalone_mode_mirrors_the_gateway(
    case: str, ensemble_dir: tuple[Path, EnsembleManifest]
) -> None:
    root, _ = ensemble_dir
    env = clean_env(**SETTING_CASES[case])
    full = helper_lines(root, env=env)
    assert helper_lines(root, "--standalone", env=env) == full
    # without the gateway's packages (the vllm/vllm-openai image) it falls back by itself
    code = (
        "import runpy, sys; sys.modules['server'] = None; "
        f"sys.argv = ['vllm-args', {str(root)!r}]; "
        f"runpy.run_path({str(HELPER)!r}, run_name='__main__')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == full
    if case == "overrides":
        assert flag(full, "--max-model-len") == "1024"
        assert flag(full, "--max-logprobs") == "5"
        assert flag(full, "--dtype") == "bfloat16"
        assert flag(full, "--model") == "/data/models/other"
        assert full[-4:] == ["--seed", "7", "--max-num-seqs", "16"]


def test_helper_runs_from_any_directory(
    ensemble_dir: tuple[Path, EnsembleManifest], tmp_path: Path
) -> None:
    root, _ = ensemble_dir
    out = run_helper(root, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "--enable-lora" in out.stdout.splitlines()


@pytest.mark.parametrize("mode", [[], ["--standalone"]], ids=["gateway", "standalone"])
def test_helper_errors_are_one_line_and_print_no_arguments(mode: list[str], tmp_path: Path) -> None:
    missing = run_helper(tmp_path / "nowhere", *mode)
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.startswith("vllm-args: error:") and "ensemble.json" in missing.stderr

    root = tmp_path / "tampered"
    make_ensemble(root)
    (root / "adapters" / "m1" / ADAPTER_FILE).write_bytes(b"changed")
    bad = run_helper(root, *mode)
    assert bad.returncode == 2 and bad.stdout == ""
    assert "member m1" in bad.stderr and "Traceback" not in bad.stderr

    spaced = tmp_path / "with space"
    make_ensemble(spaced)
    split = run_helper(spaced, *mode)
    assert split.returncode == 2 and split.stdout == ""
    assert "whitespace" in split.stderr


def test_helper_rejects_bad_settings(ensemble_dir: tuple[Path, EnsembleManifest]) -> None:
    root, _ = ensemble_dir
    for mode in ([], ["--standalone"]):
        out = run_helper(root, *mode, env=clean_env(SOFTSPEC_MAX_MODEL_LEN="8"))
        assert out.returncode == 2 and out.stdout == "", mode
        assert "SOFTSPEC_MAX_MODEL_LEN" in out.stderr


# ---------------------------------------------------------------------------- start-up line


def vllm_scripts() -> dict[str, str]:
    """The vLLM containers' shell lines as the shell receives them."""
    services = compose()["services"]
    entry = services["vllm"]["entrypoint"]
    assert entry[:2] == ["sh", "-c"], entry
    cmd = only_container(k8s_find("Deployment", "vllm"))["command"]
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


@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_startup_line_execs_vllm_with_the_helper_arguments(
    where: str, ensemble_dir: tuple[Path, EnsembleManifest], fake_python: tuple[Path, Path]
) -> None:
    root, _ = ensemble_dir
    bindir, record = fake_python
    out = run_script(vllm_scripts()[where], root, bindir, record)
    assert out.returncode == 0, out.stderr
    argv = record.read_text().splitlines()
    assert argv[:2] == ["-m", VLLM_MODULE]
    assert argv[2:] == helper_lines(root)


@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_startup_line_stops_when_the_helper_fails(
    where: str, tmp_path: Path, fake_python: tuple[Path, Path]
) -> None:
    bindir, record = fake_python
    out = run_script(vllm_scripts()[where], tmp_path / "no-ensemble", bindir, record)
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


def test_dockerfile_copies_existing_files_and_every_package() -> None:
    copies = [args for op, args in dockerfile_instructions() if op in {"COPY", "ADD"}]
    assert copies
    sources: set[str] = set()
    for args in copies:
        args = [a for a in args if not a.startswith("--")]
        for src in args[:-1]:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
            sources.add(src.rstrip("/"))
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert "pyproject.toml" in sources
    missing = packages - sources
    assert not missing, f"the image's `pip install .` needs {missing}, which it does not copy"
    workdirs = [args[0] for op, args in dockerfile_instructions() if op == "WORKDIR"]
    assert workdirs[-1] == str(Path(IMAGE_HELPER).parent.parent)  # vllm-args.py's root


def test_compose_builds_the_repository_dockerfile() -> None:
    services = compose()["services"]
    builds = [s["build"] for s in services.values() if "build" in s]
    assert builds
    for b in builds:
        assert (DEPLOY / b["context"]).resolve() == REPO
        assert (DEPLOY / b["context"] / b.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    built = {s["image"] for s in services.values() if "build" in s}
    assert services["vllm"]["image"] in built, "vllm must run the image the gateway builds"
    # no build: the GPU override swaps the image, which must not get our build tagged on it
    assert "build" not in services["vllm"]


def test_helper_is_in_the_compose_vllm_container() -> None:
    copied = any(
        op in {"COPY", "ADD"}
        and any(a.rstrip("/") in {"deploy", "deploy/vllm-args.py"} for a in args)
        for op, args in dockerfile_instructions()
    )
    mounts = [str(v).split(":") for v in compose()["services"]["vllm"].get("volumes", [])]
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
    # the stock image has no softspec: vllm-args.py needs the ensemble package next to it
    mounts = [str(v).split(":") for v in vllm.get("volumes", [])]
    ens = Path(IMAGE_HELPER).parent.parent / "ensemble"
    assert any(m[1] == str(ens) and (DEPLOY / m[0]).resolve() == REPO / "ensemble" for m in mounts)
    assert "entrypoint" not in vllm, "the base start-up line (python3, set -e) must apply"
