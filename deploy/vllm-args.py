#!/usr/bin/env python3
"""Print the vLLM server arguments for an ensemble directory, one argument per line.

    python3 deploy/vllm-args.py ENSEMBLE_DIR [--host 0.0.0.0] [--port 8000] [--embedder]

With ``--embedder`` it prints instead the arguments of the ``prompt_distance`` embedder: the
ensemble's base model as a vLLM pooling server (``server.vllm_args.embedder_args``).

The adapters' served names carry the manifest's content hash
(``<ensemble>-<version>-<member>``, ``EnsembleManifest.served_name``), so a vLLM server
started outside ``softspec serve`` (docker compose, Kubernetes) must compute them from the
ensemble. The compose and Kubernetes files start vLLM with::

    sh -c 'set -ef; args=$(python3 /app/deploy/vllm-args.py /data/ensemble);
           exec python3 -m vllm.entrypoints.openai.api_server $args'

The list comes from the same builder ``softspec serve`` uses for its own vLLM child
(``server.vllm_args.ensemble_args``), with the ``SOFTSPEC_*`` settings that shape vLLM:
``SOFTSPEC_BASE_MODEL``, ``SOFTSPEC_TOP_LOGPROBS``, ``SOFTSPEC_MAX_MODEL_LEN``,
``SOFTSPEC_VLLM_DTYPE``, ``SOFTSPEC_VLLM_ARGS``. That builder needs only pydantic and the
repository's ``ensemble`` and ``server`` packages: installed in our images, mounted next to
``deploy/`` in the official ``vllm/vllm-openai`` image (deploy/compose.gpu.yaml).

Adapter hashes are verified first. Exit status 2 with one ``vllm-args: error: ...`` line on
stderr (and nothing on stdout) when the ensemble is missing or broken, or when an argument
holds whitespace or a glob character (the shell would split or expand it).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

_UNSAFE = re.compile(r"[\s*?\[\]]")

# The repository root (…/deploy/..) holds the ``ensemble`` and ``server`` packages, both in
# a checkout and in the image (/app); in the vllm/vllm-openai image both are mounted.
_ROOT = Path(__file__).resolve().parent.parent
if (_ROOT / "ensemble" / "__init__.py").is_file() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


class ArgsError(Exception):
    """Something the operator must fix; printed as one line."""


def ensemble_args(root: Path, host: str, port: int, embedder: bool = False) -> list[str]:
    """The arguments ``softspec serve`` would give its vLLM child for ``root``."""
    try:
        from pydantic import ValidationError

        from ensemble import manifest as manifest_io
        from ensemble.errors import SoftspecError
        from server import vllm_args
    except ImportError as exc:
        raise ArgsError(
            f"cannot import the gateway's packages ({exc}): mount the repository's ensemble/ "
            f"and server/ next to deploy/ (at {_ROOT})"
        ) from exc
    try:
        shape = vllm_args.VLLMShape.from_env()
        build = vllm_args.ensemble_embedder_args if embedder else vllm_args.ensemble_args
        return build(root, manifest_io.load(root), shape, host, port)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(x) for x in first["loc"])
        raise ArgsError(f"SOFTSPEC_{field.upper()}: {first['msg']}") from exc
    except SoftspecError as exc:
        raise ArgsError(str(exc)) from exc


def build_args(root: Path, host: str, port: int, embedder: bool = False) -> list[str]:
    if not (root / "ensemble.json").is_file():
        raise ArgsError(
            f"{root}/ensemble.json not found: fill the data volume first with "
            "`docker compose -f deploy/compose.yaml run --rm populate` (Kubernetes: "
            "`kubectl apply -f deploy/k8s/populate-job.yaml`; see deploy/README.md)"
        )
    args = ensemble_args(root, host, port, embedder)
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
        "--embedder", action="store_true", help="the prompt_distance embedder's arguments"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        args = build_args(ns.ensemble, ns.host, ns.port, ns.embedder)
    except ArgsError as exc:
        print(f"vllm-args: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
