#!/usr/bin/env python3
"""Print the vLLM server arguments for an ensemble directory, one argument per line.

    python3 deploy/vllm-args.py ENSEMBLE_DIR [--host 0.0.0.0] [--port 8000] [--standalone]

The adapters' served names carry the manifest's content hash
(``<ensemble>-<version>-<member>``, ``EnsembleManifest.served_name``), so a vLLM server
started outside ``softspec serve`` (docker compose, Kubernetes) must compute them from the
ensemble. The compose and Kubernetes files start vLLM with::

    sh -c 'set -ef; args=$(python3 /app/deploy/vllm-args.py /data/ensemble);
           exec python3 -m vllm.entrypoints.openai.api_server $args'

The arguments are exactly those ``softspec serve`` gives its own vLLM child
(``server.launch.vllm_process``), including the ``SOFTSPEC_*`` settings that shape vLLM:
``SOFTSPEC_BASE_MODEL``, ``SOFTSPEC_TOP_LOGPROBS``, ``SOFTSPEC_MAX_MODEL_LEN``,
``SOFTSPEC_VLLM_DTYPE``, ``SOFTSPEC_VLLM_ARGS``. Where the gateway's packages are not
installed (the official ``vllm/vllm-openai`` image with only ``ensemble/`` mounted), or with
``--standalone``, the same list is built from ``ensemble.manifest`` alone (needs numpy and
pydantic, which vLLM has).

Adapter hashes are verified first. Exit status 2 with one ``vllm-args: error: ...`` line on
stderr (and nothing on stdout) when the ensemble is missing or broken, or when an argument
holds whitespace or a glob character (the shell would split or expand it).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
_UNSAFE = re.compile(r"[\s*?\[\]]")
# Mirrors of server/vllm_process.py (standalone mode); tests compare both modes.
_RANK_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# The repository root (…/deploy/..) holds the ``ensemble`` and ``server`` packages, both in
# a checkout and in the image (/app); in the vllm/vllm-openai image ``ensemble`` is mounted.
_ROOT = Path(__file__).resolve().parent.parent
if (_ROOT / "ensemble" / "__init__.py").is_file() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


class ArgsError(Exception):
    """Something the operator must fix; printed as one line."""


def gateway_args(root: Path, host: str, port: int) -> list[str]:
    """The arguments ``softspec serve`` would use (``server.launch.vllm_process``)."""
    from pydantic import ValidationError

    from ensemble import manifest as manifest_io
    from ensemble.errors import SoftspecError
    from server.launch import vllm_process
    from server.settings import Settings

    try:
        settings = Settings(ensemble=root)  # the rest from SOFTSPEC_*
        proc = vllm_process(settings, manifest_io.load(root))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(x) for x in first["loc"])
        raise ArgsError(f"SOFTSPEC_{field.upper()}: {first['msg']}") from exc
    except SoftspecError as exc:
        raise ArgsError(str(exc)) from exc
    proc.host, proc.port = host, port
    cmd = proc.command()
    if cmd[1:3] != ["-m", VLLM_MODULE]:  # pragma: no cover - guards against drift
        raise ArgsError(f"unexpected vLLM command from server.launch: {cmd[:3]}")
    return cmd[3:]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ArgsError(f"{name}: {raw!r} is not an integer") from None


def _split(raw: str) -> list[str]:
    return [s.strip() for s in raw.replace(",", " ").split() if s.strip()]


def _cuda_available() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and b"GPU" in out.stdout


def standalone_args(root: Path, host: str, port: int) -> list[str]:
    """The same list from ``ensemble.manifest`` alone (mirrors ``VLLMProcess.command``)."""
    try:
        from ensemble import manifest as manifest_io
        from ensemble.errors import SoftspecError
    except ImportError as exc:
        raise ArgsError(
            f"cannot import the ensemble package ({exc}): mount the repository's ensemble/ "
            f"next to deploy/ (at {_ROOT / 'ensemble'})"
        ) from exc

    try:
        manifest = manifest_io.load(root)
    except SoftspecError as exc:
        raise ArgsError(str(exc)) from exc
    base = os.environ.get("SOFTSPEC_BASE_MODEL") or manifest.resolve_base_model(root)
    top_logprobs = _env_int("SOFTSPEC_TOP_LOGPROBS", 20)
    max_model_len = _env_int("SOFTSPEC_MAX_MODEL_LEN", 2048)
    if not 1 <= top_logprobs <= 20:
        raise ArgsError(f"SOFTSPEC_TOP_LOGPROBS: {top_logprobs} is not between 1 and 20")
    if max_model_len < 16:
        raise ArgsError(f"SOFTSPEC_MAX_MODEL_LEN: {max_model_len} is below 16")
    dtype = os.environ.get("SOFTSPEC_VLLM_DTYPE", "float32")
    extra = _split(os.environ.get("SOFTSPEC_VLLM_ARGS", ""))
    adapters = {
        manifest.served_name(m): str(manifest.adapter_dir(root, m).resolve())
        for m in manifest.member_names
    }
    rank = next((b for b in _RANK_BUCKETS if manifest.lora.r <= b), None)
    if rank is None:
        raise ArgsError(f"LoRA rank {manifest.lora.r} is larger than vLLM supports (512)")
    args = [
        "--model", base,
        "--host", host, "--port", str(port),
        "--dtype", dtype,
        "--max-model-len", str(max_model_len),
        "--max-logprobs", str(top_logprobs),
        "--enable-prefix-caching",
        "--disable-uvicorn-access-log",
        "--enable-lora", "--max-loras", str(max(1, len(adapters))),
        "--max-lora-rank", str(rank),
        "--lora-modules", *(f"{n}={p}" for n, p in adapters.items()),
    ]  # fmt: skip
    if not _cuda_available():
        args += ["--enforce-eager"]
    return args + extra


def build_args(root: Path, host: str, port: int, standalone: bool) -> list[str]:
    if not (root / "ensemble.json").is_file():
        raise ArgsError(
            f"{root}/ensemble.json not found: fill the data volume first with "
            "`docker compose -f deploy/compose.yaml run --rm populate` (Kubernetes: "
            "`kubectl apply -f deploy/k8s/populate-job.yaml`; see deploy/README.md)"
        )
    if not standalone:
        try:
            import server.launch  # noqa: F401 - probe: the gateway's packages are installed
        except ImportError:
            standalone = True
    args = (standalone_args if standalone else gateway_args)(root, host, port)
    bad = [a for a in args if _UNSAFE.search(a)]
    if bad:
        raise ArgsError(
            f"argument {bad[0]!r} holds whitespace or a glob character, which the shell "
            "would split or expand: rename the path"
        )
    return args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-args", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("ensemble", type=Path, help="ensemble directory (ensemble.json)")
    p.add_argument("--host", default="0.0.0.0", help="vLLM bind address (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8000, help="vLLM port (default 8000)")
    p.add_argument(
        "--standalone",
        action="store_true",
        help="use ensemble.manifest only, even when the gateway's packages are installed",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        args = build_args(ns.ensemble, ns.host, ns.port, ns.standalone)
    except ArgsError as exc:
        print(f"vllm-args: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
