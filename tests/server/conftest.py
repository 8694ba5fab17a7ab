"""A gateway on a fake vLLM (httpx.MockTransport): real app, real engine client, fake model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from ensemble.atomic import sha256_file
from ensemble.density import REFERENCE_FILE, fit_gaussian, reference_bytes
from ensemble.manifest import DensitySpec, EnsembleManifest, GateSpec, LoraSpec, MemberSpec
from server.app import create_app
from server.settings import Settings
from server.vllm_engine import VLLMEngine
from tests.server.fake_vllm import HIDDEN, FakeVLLM


def make_manifest(root: Path, k: int = 3, alpha: float = 0.8, weights: list[float] | None = None,
                  gate: GateSpec | None = None, density: bool = False) -> EnsembleManifest:  # fmt: skip
    members = []
    for i in range(k):
        adir = root / "adapters" / f"m{i}"
        adir.mkdir(parents=True, exist_ok=True)
        (adir / "adapter_model.safetensors").write_bytes(f"w{i}".encode())
        (adir / "adapter_config.json").write_text("{}")
        w = (weights or [1 / k] * k)[i]
        members.append(
            MemberSpec(
                name=f"m{i}",
                adapter=f"adapters/m{i}",
                weight=w,
                sha256=sha256_file(adir / "adapter_model.safetensors"),
            )
        )
    m = EnsembleManifest(
        name="ens", base_model="base", objective="sft", alpha=alpha, members=members,
        lora=LoraSpec(r=8, alpha=16, target_modules=["q_proj"]), gate=gate or GateSpec(),
        density=write_reference(root) if density else None,
    )  # fmt: skip
    m.save(root)
    return m


def write_reference(root: Path) -> DensitySpec:
    """A prompt_distance reference of the fake base: fitted to the hidden states of 40
    fake tokens (ids 1..40), one row each, as if each were a training prompt."""
    ref = fit_gaussian(FakeVLLM.hidden(list(range(1, 41))), shrinkage=0.1)
    root.mkdir(parents=True, exist_ok=True)
    (root / REFERENCE_FILE).write_bytes(reference_bytes(ref))
    return DensitySpec(
        sha256=sha256_file(root / REFERENCE_FILE), shrinkage=0.1, n=ref.n, dim=HIDDEN
    )


Factory = Callable[..., tuple[TestClient, FakeVLLM, EnsembleManifest]]


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Factory]:
    """Build a gateway: ``gateway(k=3, personalities=[0, 1, 2], **settings)``; ``fallback``
    is the transport of the gate's fallback (set ``fallback_url`` too); ``density`` gives the
    ensemble a prompt_distance reference and ``embed`` the engine an embedder (the fake's
    ``/pooling``)."""
    clients: list[TestClient] = []

    def build(k: int = 3, personalities: list[int] | None = None, alpha: float = 0.8,
              weights: list[float] | None = None, gate: GateSpec | None = None,
              max_model_len: int = 256, fallback: httpx.MockTransport | None = None,
              engine_class: type[VLLMEngine] = VLLMEngine, density: bool = False,
              embed: bool = False, **settings: object) -> tuple[TestClient, FakeVLLM, EnsembleManifest]:  # fmt: skip
        root = tmp_path / f"ens{len(clients)}"
        manifest = make_manifest(root, k, alpha, weights, gate, density)
        pers = personalities if personalities is not None else list(range(k))
        fake = FakeVLLM(
            {manifest.served_name(m): p for m, p in zip(manifest.member_names, pers, strict=True)},
            max_model_len,
        )
        cfg = Settings(ensemble=root, max_model_len=max_model_len, **settings)  # type: ignore[arg-type]

        def engine(man: EnsembleManifest, metrics):  # type: ignore[no-untyped-def]
            return engine_class(
                "http://vllm",
                man,
                metrics=metrics,
                transport=fake.transport(),
                max_model_len=max_model_len,
                embed_url="http://embedder" if embed else None,
            )

        client = TestClient(create_app(cfg, engine, fallback_transport=fallback))
        client.__enter__()
        clients.append(client)
        return client, fake, manifest

    yield build
    for c in clients:
        c.__exit__(None, None, None)
