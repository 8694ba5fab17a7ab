"""Schemathesis against the gateway's own OpenAPI schema, on the fake vLLM.

Every operation of ``/openapi.json`` is fuzzed with valid (positive) and invalid
(negative) requests; every answer must be below 500, and every 4xx must be the OpenAI
error envelope. ``SOFTSPEC_FUZZ_CASES`` sets the total budget (default 2,000, and
all of them must run; docs/reliability.md reports a 10,000-case run).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

from ensemble.manifest import EnsembleManifest
from server.app import create_app
from server.metrics import Metrics
from server.settings import Settings
from server.vllm_engine import VLLMEngine
from tests.server.conftest import make_manifest
from tests.server.fake_vllm import BOS, VOCAB, FakeVLLM

BUDGET = int(os.environ.get("SOFTSPEC_FUZZ_CASES", "2000"))
MINIMUM = 2_000
BASE = "http://testserver"
# the budget goes where the input space is: the two generation endpoints (valid and
# invalid requests alike); the GET endpoints take no input and run a few times each
SHARE = {"/v1/chat/completions": 0.5, "/v1/completions": 0.5}


def like_vllm(fake: FakeVLLM) -> httpx.MockTransport:
    """The fake, plus the input check of real vLLM it lacks: token ids outside the
    vocabulary are a 400 ("Token id N is out of vocabulary"), not a crash of the model."""
    known = set(range(len(VOCAB))) | {BOS}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/completions" and request.content:
            prompt = json.loads(request.content).get("prompt")
            rows = prompt if prompt and isinstance(prompt[0], list) else [prompt]
            bad = [t for row in rows if isinstance(row, list) for t in row if t not in known]
            if bad:
                message = f"Token id {max(bad)} is out of vocabulary"
                return httpx.Response(400, json={"error": {"message": message}})
        return fake.handler(request)

    return httpx.MockTransport(handler)


def app_of(root: Path) -> FastAPI:
    manifest = make_manifest(root, 2)
    fake = FakeVLLM({manifest.served_name(m): i for i, m in enumerate(manifest.member_names)})

    def engine(man: EnsembleManifest, metrics: Metrics) -> VLLMEngine:
        return VLLMEngine("http://vllm", man, metrics=metrics, transport=like_vllm(fake))

    cfg = Settings(ensemble=root, max_model_len=256, max_body_bytes=64_000,
                   max_prompt_chars=2_000)  # fmt: skip
    return create_app(cfg, engine, manifest)


def schema_of(app: FastAPI) -> Any:
    """The app's own OpenAPI schema; ``model`` narrowed to the served ids in valid requests,
    so positive cases reach the engine (negative cases still send any model)."""
    raw = app.openapi()
    ids = ["ens", "ens:m0", "ens:m1"]
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        raw["components"]["schemas"][name]["properties"]["model"] = {"type": "string", "enum": ids}
    return schemathesis.openapi.from_dict(raw)


def check(response: Any, where: str) -> None:
    assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:500]}"
    if response.status_code < 400:
        return
    body = json.loads(response.text)
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, f"{where}: {body}"
    assert isinstance(err["message"], str) and err["message"], f"{where}: {body}"


def fuzz(
    client: TestClient, op: Any, mode: GenerationMode, n: int,
    ran: Counter[str], statuses: Counter[int],
) -> None:  # fmt: skip
    """Send up to ``n`` cases of one operation in one generation mode through ``client``."""
    label = f"{op.method.upper()} {op.path} ({mode.value})"

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(
        max_examples=n, deadline=None, derandomize=True, database=None,
        suppress_health_check=list(HealthCheck), print_blob=True,
    )  # fmt: skip
    def one(case: Any) -> None:
        kwargs = case.as_transport_kwargs(base_url=BASE)
        assert not kwargs.pop("cookies", None)  # the schema has none
        if isinstance(kwargs.get("data"), bytes | str):  # raw bodies, in httpx terms
            kwargs["content"] = kwargs.pop("data")
        response = client.request(**kwargs)
        ran[label] += 1
        statuses[response.status_code] += 1
        check(response, f"{label} {case.body!r:.300}")

    try:
        one()
    except Unsatisfiable:  # no inputs to make invalid (e.g. GET /health)
        assert mode == GenerationMode.NEGATIVE and not ran[label], label


def test_fuzzed_requests_never_get_a_5xx_and_errors_are_enveloped(tmp_path: Path) -> None:
    app = app_of(tmp_path)
    schema = schema_of(app)
    client = TestClient(app)
    client.__enter__()
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/ready"} <= paths
    ran: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    t0 = time.perf_counter()
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            n = round(BUDGET * SHARE[op.path] / 2) if op.path in SHARE else 3
            fuzz(client, op, mode, n, ran, statuses)
    took = time.perf_counter() - t0
    client.__exit__(None, None, None)
    total = sum(ran.values())
    print(f"\nschemathesis: {total} requests in {took:.1f} s; statuses {dict(statuses)}")
    for label, count in sorted(ran.items()):
        print(f"  {count:6d}  {label}")
    assert total >= min(MINIMUM, BUDGET), ran  # hypothesis ran every case it was asked for
    assert statuses[200] > 0 and any(400 <= s < 500 for s in statuses), statuses


@pytest.mark.parametrize(
    "content",
    [
        b'{"model": "ens", "messages": [' + b"[" * 5000 + b"]" * 5000 + b"]}",  # deep nesting
        b'{"model": "' + b"m" * 50_000 + b'", "messages": []}',  # a huge model name
        b'{"model": "ens", "prompt": "hi", "max_tokens": 1e400}',  # overflows a float
        b'{"model": "ens", "prompt": "hi", "temperature": NaN}',  # not JSON
        b"\xff\xfe not utf-8",
    ],
)
def test_hostile_bodies_are_4xx_in_the_envelope(tmp_path: Path, content: bytes) -> None:
    with TestClient(app_of(tmp_path)) as client:
        for path in ("/v1/chat/completions", "/v1/completions"):
            r = client.post(path, content=content, headers={"content-type": "application/json"})
            check(r, path)
            assert 400 <= r.status_code < 500
