#!/usr/bin/env python3
"""An uncertainty-gated pipeline in a few lines: send a mixed batch, route on the gate.

    python clients/example_pipeline.py --base-url http://localhost:8080/v1
    python clients/example_pipeline.py --gate '{"threshold": 0.9, "action": "abstain"}'

Each prompt goes to the ensemble through the official ``openai`` SDK; the gateway's
``gate`` extra says what happened to it — ``pass`` (answered by the specialists), ``flag``
(answered, marked for review), ``escalate`` (answered by the fallback model, named in
``gate.routed_to``) or ``abstain`` (withheld) — and the script prints one line per prompt
and the counts. ``--gate`` tightens the server's gate for this batch (``ensemble.gate``;
docs/routing.md). Against the docker compose deployment with the optional fallback:

    SOFTSPEC_GATE_ACTION=escalate SOFTSPEC_FALLBACK_URL=http://fallback:8000/v1 \\
      docker compose -f deploy/compose.yaml --profile fallback up -d
    python clients/example_pipeline.py --base-url http://localhost:8080/v1
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import openai

__all__ = ["DECISIONS", "PROMPTS", "route", "run"]

DECISIONS = ("pass", "flag", "escalate", "abstain")
# A mixed batch: topics the default ensemble was trained on, and prompts far from them
# (other languages, held-out topics, arithmetic, code).
PROMPTS = [
    "What is AI?",
    "Tell me a joke.",
    "What is your favorite book?",
    "¿Cuál es tu color favorito?",
    "Who invented the steam engine?",
    "What is 37 times 48?",
    "Write a SQL query that counts orders per customer.",
]


def route(
    client: openai.OpenAI, model: str, prompt: str, gate: dict[str, Any] | None, max_tokens: int
) -> dict[str, Any]:
    """One prompt through the gate: the decision, its score, who answered, the answer."""
    extra: dict[str, Any] = {"ensemble": {"gate": gate}} if gate else {}
    resp = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        extra_body=extra,
    )
    g = (resp.model_extra or {}).get("gate") or {}
    return {
        "decision": g.get("decision", "?"),
        "score": g.get("score"),
        "score_name": g.get("score_name"),
        "stage": g.get("stage"),
        "routed_to": g.get("routed_to"),
        "failed": (g.get("escalation") or {}).get("outcome") == "failed",
        "answer": resp.choices[0].message.content or "",
    }


def run(
    client: openai.OpenAI,
    model: str,
    prompts: Sequence[str],
    gate: dict[str, Any] | None = None,
    max_tokens: int = 48,
    out: Any = sys.stdout,
) -> Counter[str]:
    """Route every prompt, print a line each and the counts; returns the counts."""
    counts: Counter[str] = Counter()
    for prompt in prompts:
        r = route(client, model, prompt, gate, max_tokens)
        counts[r["decision"]] += 1
        who = f" → {r['routed_to']}" if r["routed_to"] else ""
        note = " (escalation failed)" if r["failed"] else ""
        score = f"{r['score_name']}={r['score']:.3g}" if r["score"] is not None else "-"
        answer = " ".join(r["answer"].split())[:60]
        print(
            f"{r['decision']:>8}{who}{note}  {score} [{r['stage']}]  {prompt!r}: {answer}", file=out
        )
    print("counts: " + "  ".join(f"{d} {counts[d]}" for d in DECISIONS), file=out)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--base-url", default="http://localhost:8080/v1", help="the gateway's /v1")
    p.add_argument("--api-key", default="unused", help="a SOFTSPEC_API_KEYS key, if set")
    p.add_argument("--model", help="model id (default: the gateway's ensemble)")
    p.add_argument("--prompts", type=Path, help="a file with one prompt per line")
    p.add_argument("--gate", help='per-request gate as JSON, e.g. {"threshold": 0.9}')
    p.add_argument("--max-tokens", type=int, default=48)
    args = p.parse_args(argv)
    try:
        gate = json.loads(args.gate) if args.gate else None
        prompts = (
            [ln.strip() for ln in args.prompts.read_text().splitlines() if ln.strip()]
            if args.prompts
            else PROMPTS
        )
    except (ValueError, OSError) as exc:
        print(f"example_pipeline: error: {exc}", file=sys.stderr)
        return 2
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
    try:
        model = args.model or client.models.list().data[0].id
        run(client, model, prompts, gate, args.max_tokens)
    except openai.APIError as exc:
        print(f"example_pipeline: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
