"""Session fixtures for the real stack: a trained SmolLM2 ensemble, vLLM, gateways.

One vLLM server (real, CPU) serves the adapters of two ensembles: ``smol`` (3 members
trained with the α-Rényi trainer, so their LoRA weights differ) and ``same`` (the same
adapter three times). Gateways are real ``softspec serve --vllm-url`` processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ensemble.atomic import sha256_file
from ensemble.manifest import load as load_manifest
from server.vllm_process import VLLMProcess, free_port


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
    out = tmp_path_factory.mktemp("same") / "same"
    shutil.copytree(smol_ensemble, out)
    raw = json.loads((out / "ensemble.json").read_text())
    raw["name"] = "same"
    for m in raw["members"][1:]:
        shutil.rmtree(out / m["adapter"])
        shutil.copytree(out / raw["members"][0]["adapter"], out / m["adapter"])
        m["sha256"] = sha256_file(out / m["adapter"] / "adapter_model.safetensors")
    (out / "ensemble.json").write_text(json.dumps(raw, indent=2))
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


def start_gateway(ensemble: Path, vllm_url: str | None, *extra: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:  # fmt: skip
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "softspec.cli",
        "serve",
        "--ensemble",
        str(ensemble),
        "--port",
        str(port),
    ]
    if vllm_url:
        cmd += ["--vllm-url", vllm_url]
    log = tempfile.NamedTemporaryFile(prefix="softspec-gateway-", suffix=".log", delete=False)  # noqa: SIM115
    with log:
        proc = subprocess.Popen([*cmd, *extra], env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    proc.log_path = log.name  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = Path(log.name).read_text(errors="replace")
            raise RuntimeError(f"gateway exited {proc.returncode}: {out[-2000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("gateway not ready in time")


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


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
