"""Session fixtures for the real stack: a trained SmolLM2 ensemble, vLLM, gateways.

One vLLM server (real, CPU) serves the adapters of two ensembles: ``smol`` (3 members
trained with the α-Rényi trainer, so their LoRA weights differ) and ``same`` (the same
adapter three times). Gateways are real ``softspec serve --vllm-url`` processes.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ensemble.manifest import load as load_manifest
from server.vllm_process import VLLMProcess
from softspec.serving import start_server, stop_server
from tests.helpers import clone_with_same_adapter


@pytest.fixture(scope="session")
def default_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from softspec.default_data import build_datasets

    out = tmp_path_factory.mktemp("data") / "data"
    build_datasets(out)
    return out


@pytest.fixture(scope="session")
def smol_ensemble(
    tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path, default_data: Path
) -> Path:
    """3 members on SmolLM2, a few α-Rényi steps at a high learning rate (members differ)."""
    from softspec.cli import main

    root = tmp_path_factory.mktemp("ens")
    rows = (default_data / "sft_topics_train.jsonl").read_text().splitlines()[:24]
    data = root / "train.jsonl"
    data.write_text("\n".join(rows) + "\n")
    out = root / "smol"
    args = ["train", "sft", "--base", str(smollm2_dir), "--data", str(data), "--out", str(out),
            "--members", "3", "--alpha", "1", "--max-steps", "3", "--batch-size", "4",
            "--learning-rate", "3e-3", "--max-length", "96", "--lora-r", "8",
            "--routing-examples", "8", "--lora-dropout", "0"]  # fmt: skip
    assert main(args) == 0
    return out


@pytest.fixture(scope="session")
def same_ensemble(smol_ensemble: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same adapter three times: no epistemic uncertainty by construction."""
    out = clone_with_same_adapter(smol_ensemble, tmp_path_factory.mktemp("same") / "same", "same")
    load_manifest(out)  # still a valid, verified ensemble
    return out


@pytest.fixture(scope="session")
def vllm_server(
    smollm2_dir: Path, smol_ensemble: Path, same_ensemble: Path
) -> Iterator[VLLMProcess]:
    adapters = {}
    for root in (smol_ensemble, same_ensemble):
        m = load_manifest(root)
        adapters.update({m.served_name(x): str(m.adapter_dir(root, x)) for x in m.member_names})
    proc = VLLMProcess(str(smollm2_dir), adapters=adapters, max_lora_rank=8, max_logprobs=20)
    with proc:
        yield proc


@pytest.fixture(scope="session")
def embedder(smollm2_dir: Path) -> Iterator[VLLMProcess]:
    """The base model as a vLLM pooling server (the prompt_distance embedder)."""
    with VLLMProcess(str(smollm2_dir), embedder=True) as proc:
        yield proc


def start_gateway(ensemble: Path, vllm_url: str | None, *extra: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:  # fmt: skip
    """A real `softspec serve` process (its own vLLM child unless ``vllm_url``)."""
    args = [*(["--vllm-url", vllm_url] if vllm_url else []), *extra]
    log = Path(tempfile.mkdtemp(prefix="softspec-gateway-")) / "serve.log"
    return start_server(ensemble, "vllm", log, args, timeout=600, env=env)


def stop(proc: subprocess.Popen[bytes]) -> int:
    code = stop_server(proc)
    assert code is not None
    return code


@pytest.fixture(scope="session")
def smol_gateway(smol_ensemble: Path, vllm_server: VLLMProcess) -> Iterator[str]:
    proc, url = start_gateway(smol_ensemble, vllm_server.url)
    yield url
    stop(proc)


@pytest.fixture(scope="session")
def same_gateway(same_ensemble: Path, vllm_server: VLLMProcess) -> Iterator[str]:
    proc, url = start_gateway(same_ensemble, vllm_server.url)
    yield url
    stop(proc)
