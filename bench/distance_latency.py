"""Benchmark: the latency ``prompt_distance`` adds to a request, in the same run.

Two real gateways on one vLLM: A is ``softspec serve`` on an ensemble with a reference
(it starts vLLM and the embedder), B is ``softspec serve --vllm-url <A's vLLM>`` without an
embedder (gate overridden to a score that does not need the distance). Chat requests
alternate A, B on the same prompts, one at a time; the ratio of the p50 latencies is
printed last.

    python bench/distance_latency.py [--ensemble DIR] [--reps 3] [--max-tokens 32]

Default ensemble: the one ``softspec demo`` trains ($SOFTSPEC_HOME/ensembles/demo).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ensemble.manifest import load as load_manifest
from softspec.paths import softspec_home
from softspec.serving import start_server, stop_server

PROMPTS = [
    "What is AI?",
    "Tell me a joke.",
    "Wie alt bist du?",
    "Write a SQL query that counts orders per customer.",
    "Do you like sports?",
    "What is 37 times 48?",
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ensemble", type=Path, default=None)
    p.add_argument("--reps", type=int, default=3, help="passes over the prompts")
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    ens = args.ensemble or softspec_home() / "ensembles" / "demo"
    manifest = load_manifest(ens)
    if manifest.density is None:
        raise SystemExit(f"{ens} has no prompt_distance reference: run `softspec reference`")
    logs = Path(tempfile.mkdtemp(prefix="distance-latency-"))
    a, url_a = start_server(ens, "vllm", logs / "with.log", [], timeout=900)
    b = None
    try:
        vllm = re.findall(r"vLLM ready at (http://\S+)", (logs / "with.log").read_text())[0]
        extra = ["--vllm-url", vllm, "--gate-score", "epistemic"]
        b, url_b = start_server(ens, "vllm", logs / "without.log", extra, timeout=900)
        lat: dict[str, list[float]] = {"with": [], "without": []}
        for _ in range(args.reps):
            for prompt in PROMPTS:
                for name, url in (("with", url_a), ("without", url_b)):
                    body = {"model": manifest.name, "max_tokens": args.max_tokens,
                            "messages": [{"role": "user", "content": prompt}], "temperature": 0}  # fmt: skip
                    t0 = time.perf_counter()
                    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
                    r.raise_for_status()
                    lat[name].append(time.perf_counter() - t0)
                    served = r.json()["choices"][0]["uncertainty"]["prompt_distance"] is not None
                    assert served == (name == "with"), "the gateways are not what they should be"
        for name, v in lat.items():
            print(f"{name} the embedder: p50 {statistics.median(v):.3f} s, "
                  f"mean {statistics.mean(v):.3f} s over {len(v)} requests")  # fmt: skip
        ratio = statistics.median(lat["with"]) / statistics.median(lat["without"])
        print(f"ratio of p50s (with / without): {ratio:.3f}")
    finally:
        if b is not None:
            stop_server(b)
        stop_server(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
