"""``softspec serve``: validate settings, start the engine (a vLLM child process unless
``--vllm-url``), and run the gateway with uvicorn until SIGINT/SIGTERM.

Which engine serves is the application's choice (``softspec/serve_cmd.py`` passes it in
as ``choose_engine``); this module knows only its own, vLLM.

Everything is checked before anything starts: the settings (flags over ``SOFTSPEC_*``
variables), the manifest and adapter hashes, the gateway port. A vLLM child is stopped
on every exit path (normal, signal, error); if this process is killed outright, the
child gets SIGTERM from the kernel (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from ensemble import manifest as manifest_io
from ensemble.errors import ConfigError
from server.engine import Engine
from server.gate import GateAction
from server.metrics import Metrics
from server.settings import Settings
from server.supervisor import ChildGroup, Restartable
from server.vllm_args import cuda_available, ensemble_adapters, ensemble_model
from server.vllm_process import VLLMProcess, _port_free

__all__ = [
    "EngineChoice",
    "EngineFactory",
    "build_parser",
    "embedder_process",
    "run_serve",
    "settings_from_args",
    "vllm_engine",
    "vllm_process",
]

log = logging.getLogger("softspec.server")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="softspec serve",
        description="Serve an ensemble behind an OpenAI-compatible API with uncertainty. "
        "Every option can also be set as SOFTSPEC_<OPTION> (e.g. SOFTSPEC_GATE_THRESHOLD).",
    )
    p.add_argument("--ensemble", type=Path, help="ensemble directory (ensemble.json)")
    p.add_argument("--engine", choices=["vllm", "local"], help="vllm (default) or local")
    p.add_argument("--vllm-url", help="use this running vLLM server instead of starting one")
    p.add_argument("--embed-url", help="use this running vLLM pooling server for prompt_distance")
    p.add_argument("--base-model", help="override the manifest's base model path")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--gate-score", help="uncertainty score the gate thresholds")
    p.add_argument("--gate-threshold", type=float, help="gate threshold (higher score = less sure)")
    p.add_argument(
        "--gate-action", choices=[a.value for a in GateAction], help="what the gate does above it"
    )
    p.add_argument(
        "--gate-allow-loosen",
        action="store_const",
        const=True,
        help="let clients loosen the gate per request (default: only tighten)",
    )
    p.add_argument("--fallback-url", help="OpenAI-compatible URL (…/v1) the gate escalates to")
    p.add_argument("--fallback-model", help="the fallback's model id (default: its first)")
    p.add_argument("--fallback-timeout", type=float, help="seconds per fallback call")
    p.add_argument(
        "--fallback-on-error",
        choices=["abstain", "flag"],
        help="when the fallback fails: abstain, or flag the ensemble's answer",
    )
    p.add_argument("--api-keys", help="comma-separated bearer keys (default: no auth)")
    p.add_argument("--request-timeout", type=float, help="seconds per upstream call")
    p.add_argument("--max-model-len", type=int, help="context length given to vLLM")
    p.add_argument("--max-concurrency", type=int, help="ensemble requests running at once")
    p.add_argument("--max-queue", type=int, help="requests waiting for a slot (beyond: 429)")
    p.add_argument("--request-deadline", type=float, help="seconds a request may take in all")
    p.add_argument("--max-body-bytes", type=int, help="request body limit in bytes (413)")
    p.add_argument("--max-prompt-chars", type=int, help="prompt length limit (400)")
    p.add_argument("--vllm-max-restarts", type=int, help="failed vLLM restarts before exiting")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="log level")
    return p


def settings_from_args(argv: Sequence[str]) -> Settings:
    args = build_parser().parse_args(list(argv))
    given = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(x) for x in first["loc"])
        if not field:  # a rule across settings (e.g. the queue against the concurrency)
            raise ConfigError(str(first["msg"]).removeprefix("Value error, ")) from exc
        if first["type"] == "missing":
            raise ConfigError(
                f"--{field.replace('_', '-')} is required (or set SOFTSPEC_{field.upper()})"
            ) from exc
        raise ConfigError(f"--{field.replace('_', '-')}: {first['msg']}") from exc
    return settings


EngineFactory = Callable[[manifest_io.EnsembleManifest, Metrics], Engine]
# The application's choice of engine: (settings, the vLLM URL or None) → a factory.
EngineChoice = Callable[[Settings, str | None], EngineFactory]


def vllm_engine(settings: Settings, url: str | None) -> EngineFactory:
    """The gateway's own engine: vLLM at ``url`` (the child's or ``--vllm-url``)."""
    from server.vllm_engine import VLLMEngine

    def vllm(manifest: manifest_io.EnsembleManifest, metrics: Metrics) -> Engine:
        if url is None:
            raise ConfigError(
                "the vLLM engine needs a URL: pass --vllm-url or let serve start vLLM"
            )
        return VLLMEngine(
            url, manifest, timeout=settings.request_timeout, metrics=metrics,
            max_model_len=settings.max_model_len,
            # an embedder is used (and must be up) only for an ensemble with a reference
            embed_url=settings.embed_url if manifest.density is not None else None,
        )  # fmt: skip

    return vllm


def vllm_process(settings: Settings, manifest: manifest_io.EnsembleManifest) -> VLLMProcess:
    """The vLLM child for this ensemble: every member as a versioned LoRA module."""
    root = Path(settings.ensemble)
    return VLLMProcess(
        model=ensemble_model(root, manifest, settings),
        adapters=ensemble_adapters(root, manifest),
        max_lora_rank=manifest.lora.r,
        max_logprobs=settings.top_logprobs,
        max_model_len=settings.max_model_len,
        dtype=settings.vllm_dtype,
        extra_args=settings.vllm_args,
        startup_timeout=settings.vllm_startup_timeout,
    )


def embedder_process(settings: Settings, manifest: manifest_io.EnsembleManifest) -> VLLMProcess:
    """The ``prompt_distance`` embedder child: the base model as a vLLM pooling model."""
    return VLLMProcess(
        model=ensemble_model(Path(settings.ensemble), manifest, settings),
        max_model_len=settings.max_model_len,
        dtype=settings.vllm_dtype,
        startup_timeout=settings.vllm_startup_timeout,
        embedder=True,
    )


# vLLM claims 90 % of a GPU's memory by default; beside the embedder the generating server
# takes 80 % (a --gpu-memory-utilization in SOFTSPEC_VLLM_ARGS comes later and wins) and
# the embedder 10 %. Not yet run on a GPU.
GPU_SHARES = (["--gpu-memory-utilization", "0.8"], ["--gpu-memory-utilization", "0.1"])


def _start_all(children: Sequence[VLLMProcess]) -> None:
    """Spawn every child from this thread (a child dies with the thread that spawned it:
    ``PR_SET_PDEATHSIG``), then wait until each answers: the start-ups overlap."""
    for c in children:
        c.start(wait=False)
    for c in children:
        c.wait_ready()


EXIT_ENGINE_LOST = 3  # vLLM could not be restarted: an outer supervisor should take over


class _Terminated(Exception):
    """SIGTERM arrived (uvicorn re-raises it after its graceful shutdown)."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated


def run_serve(argv: Sequence[str], choose_engine: EngineChoice = vllm_engine) -> int:
    """Run the gateway; ``choose_engine`` (the application's wiring) makes the engine."""
    import uvicorn

    from server.app import create_app

    settings = settings_from_args(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    manifest = manifest_io.load(settings.ensemble)
    if not _port_free(settings.host, settings.port):
        raise ConfigError(f"port {settings.port} on {settings.host} is in use: pass another --port")
    children: list[VLLMProcess] = []
    url = settings.vllm_url
    previous = signal.signal(signal.SIGTERM, _on_sigterm)  # stop the children on SIGTERM too
    try:
        if settings.engine == "vllm" and url is None:
            children.append(vllm_process(settings, manifest))
            if manifest.density is not None and settings.embed_url is None:
                children.append(embedder_process(settings, manifest))
                if cuda_available():  # one GPU, two vLLM servers: split its memory
                    children[0].extra_args = [*GPU_SHARES[0], *children[0].extra_args]
                    children[1].extra_args = [*GPU_SHARES[1]]
            what = " and the prompt_distance embedder" if len(children) > 1 else ""
            print(f"softspec: starting vLLM for {len(manifest.members)} members{what}",
                  file=sys.stderr)  # fmt: skip
            _start_all(children)
            url = children[0].url
            if len(children) > 1:
                settings = settings.model_copy(update={"embed_url": children[1].url})
            for c in children:
                print(f"softspec: vLLM ready at {c.url} (log {c.log_path})", file=sys.stderr)
        elif settings.engine == "vllm" and manifest.density is not None and not settings.embed_url:
            log.warning(
                "prompt_distance is not served: the ensemble has a reference but no embedder; "
                "pass --embed-url (a vLLM pooling server of the base) or omit --vllm-url"
            )
        child: Restartable | None = ChildGroup(*children) if children else None
        lost: list[str] = []
        server: uvicorn.Server | None = None

        def give_up(why: str) -> None:  # the supervisor ran out of restarts
            lost.append(why)
            if server is not None:
                server.should_exit = True

        app = create_app(
            settings, choose_engine(settings, url), manifest,
            supervise=settings.engine == "vllm", process=child, on_give_up=give_up,
        )  # fmt: skip
        where = f"http://{settings.host}:{settings.port}"
        print(f"softspec: serving {manifest.name} on {where}", file=sys.stderr)
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,
        )
        server = uvicorn.Server(config)
        server.run()
        if lost:
            print(f"softspec: stopped: {lost[0]}", file=sys.stderr)
            return EXIT_ENGINE_LOST
    except _Terminated:
        print("softspec: stopped (SIGTERM)", file=sys.stderr)
    finally:
        for c in children:
            c.stop()
        signal.signal(signal.SIGTERM, previous)
    return 0
