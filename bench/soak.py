"""Soak, overload and fault benchmark for a running gateway (loopback).

    python bench/soak.py --ensemble runs/topics [--levels 1,2,4,8,16] [--per-level 24]
                         [--burst 8 --burst-rounds 5] [--soak 500] [--fault]
                         [-- --max-concurrency 2 --max-queue 2]
    python bench/soak.py --url http://127.0.0.1:8000 --pid <gateway pid> ...

With ``--ensemble`` it starts ``softspec serve`` itself (its own vLLM child, so the fault
mode has a child to kill; gateway options after ``--`` are passed on, ``--vllm-url``
included). Four phases:

1. **rising concurrency** (``--levels``): at each level, that many clients send
   ``--per-level`` chat requests in all, back to back; per level: statuses, p50/p99 of
   the answered (200) and of the refused (429) requests, throughput;
2. **burst** (``--burst N``): N requests at once, ``--burst-rounds`` times; the latency
   of the 429s as the client sees it and as the gateway reports it (``Server-Timing``),
   and of ``GET /health`` probed meanwhile (what a request without engine work costs);
3. **soak** (``--soak N``): N short requests from ``--soak-concurrency`` clients (default:
   the gateway's admitted concurrency); errors, and the gateway's RSS before (after a
   warm-up) and after; fails when RSS grew more than ``--rss-bound``;
4. **fault** (``--fault``): SIGKILL the gateway's vLLM child while clients send requests,
   then report the statuses seen while it was down and the time from the kill to the first
   200 (target: vLLM start-up time + 10 s), and that the gateway process survived.

Prints a table per phase and a JSON summary (also written to ``--out``). Exit 1 when a
target is missed (a 5xx in phases 1–3, errors or RSS growth in the soak, no recovery).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.settings import Settings  # after the path: run as a script

PROMPTS = [
    "What is AI?",
    "Do you like sports?",
    "Tell me a joke.",
    "What is your favorite book?",
    "Who invented the steam engine?",
    "What is the speed of light?",
]


@dataclass
class Run:
    """Statuses and latencies of one batch of requests."""

    statuses: Counter[int] = field(default_factory=Counter)
    ok: list[float] = field(default_factory=list)  # seconds, 200s
    refused: list[float] = field(default_factory=list)  # seconds, 429s
    refused_gw: list[float] = field(default_factory=list)  # seconds, 429s, gateway's own time
    other: list[str] = field(default_factory=list)  # first lines of unexpected answers
    wall: float = 0.0

    def summary(self) -> dict[str, Any]:
        n = sum(self.statuses.values())
        return {
            "requests": n,
            "statuses": dict(sorted(self.statuses.items())),
            "ok_p50_s": pct(self.ok, 50),
            "ok_p99_s": pct(self.ok, 99),
            "rejected_429": self.statuses.get(429, 0),
            "rejected_p50_ms": ms(self.refused, 50),
            "rejected_p99_ms": ms(self.refused, 99),
            "rejected_max_ms": None if not self.refused else round(max(self.refused) * 1e3, 1),
            "rejected_gateway_p50_ms": ms(self.refused_gw, 50),
            "rejected_gateway_max_ms": None
            if not self.refused_gw
            else round(max(self.refused_gw) * 1e3, 1),
            "answers_per_s": round(len(self.ok) / self.wall, 2) if self.wall else None,
            "server_errors": sum(c for s, c in self.statuses.items() if s >= 500),
        }


def pct(xs: list[float], q: float, digits: int = 3) -> float:
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return round(xs[0], digits)
    return round(statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1], digits)


def ms(xs: list[float], q: float) -> float | None:
    """The q-th percentile in milliseconds, to 0.1 ms."""
    return None if not xs else round(pct(xs, q, digits=6) * 1e3, 1)


def gateway_seconds(r: httpx.Response) -> float | None:
    """The gateway's own time for an answer (its ``Server-Timing: gateway;dur=<ms>``)."""
    for part in r.headers.get("server-timing", "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        if name == "gateway" and dur:
            return float(dur) / 1e3
    return None


def record(run: Run, r: httpx.Response, dt: float) -> None:
    run.statuses[r.status_code] += 1
    if r.status_code == 200:
        run.ok.append(dt)
    elif r.status_code == 429:
        run.refused.append(dt)
        gw = gateway_seconds(r)
        if gw is not None:
            run.refused_gw.append(gw)
    else:
        run.other.append(f"{r.status_code} {r.text[:200]}")


def body(i: int, model: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


async def post_one(
    client: httpx.AsyncClient, run: Run, i: int, model: str, max_tokens: int
) -> None:
    """One chat request, recorded in ``run`` (a transport error counts as status 0)."""
    t0 = time.perf_counter()
    try:
        r = await client.post("/v1/chat/completions", json=body(i, model, max_tokens))
    except httpx.HTTPError as exc:
        run.statuses[0] += 1
        run.other.append(f"{type(exc).__name__}: {exc}")
        return
    record(run, r, time.perf_counter() - t0)


async def load(
    client: httpx.AsyncClient, model: str, clients: int, total: int, max_tokens: int
) -> Run:
    """``clients`` workers send ``total`` requests in all, each one after the last answer."""
    run = Run()
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            await post_one(client, run, i, model, max_tokens)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    run.wall = time.perf_counter() - t0
    return run


async def burst(
    client: httpx.AsyncClient, model: str, n: int, rounds: int, max_tokens: int
) -> dict[str, Any]:
    """``n`` requests at once, ``rounds`` times; 429 latency as the client and the gateway
    see it, and, as a control, the latency of ``GET /health`` (no engine work) probed every
    50 ms meanwhile: what any trivial request costs on the gateway at that moment."""
    run = Run()
    health: list[float] = []

    async def one(i: int) -> None:
        await post_one(client, run, i, model, max_tokens)

    async def probe(stop: asyncio.Event) -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            await client.get("/health")
            health.append(time.perf_counter() - t0)
            await asyncio.sleep(0.05)

    t0 = time.perf_counter()
    for _ in range(rounds):
        stop = asyncio.Event()
        watcher = asyncio.ensure_future(probe(stop))
        await asyncio.gather(*(one(i) for i in range(n)))
        stop.set()
        await watcher
    run.wall = time.perf_counter() - t0
    return {
        "burst": n, "rounds": rounds, **run.summary(),
        "health_p50_ms": ms(health, 50), "health_p99_ms": ms(health, 99),
        "health_max_ms": None if not health else round(max(health) * 1e3, 1),
        "unexpected": run.other[:3],
    }  # fmt: skip


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def vllm_children(gateway_pid: int) -> dict[int, bytes]:
    """The gateway's vLLM server children (direct children running a vLLM entrypoint):
    PID → command line (NUL-separated, as in /proc). The integration tests use it too."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == gateway_pid and b"vllm.entrypoints" in cmd:
            found[int(pid)] = cmd
    return found


def vllm_child(gateway_pid: int) -> int | None:
    """The gateway's vLLM server process (the first of :func:`vllm_children`)."""
    return next(iter(vllm_children(gateway_pid)), None)


async def fault(
    client: httpx.AsyncClient, model: str, gateway_pid: int, clients: int, max_tokens: int,
    budget: float,
) -> dict[str, Any]:  # fmt: skip
    """SIGKILL the vLLM child under load; time until the first 200 afterwards."""
    child = vllm_child(gateway_pid)
    if child is None:
        return {"error": "the gateway has no vLLM child (started with --vllm-url?)"}
    during: Counter[int] = Counter()
    retry_after: set[str] = set()
    stop = asyncio.Event()
    killed_at: list[float] = []
    recovered_at: list[float] = []

    async def worker(w: int) -> None:
        i = w
        while not stop.is_set():
            i += clients
            try:
                r = await client.post("/v1/chat/completions", json=body(i, model, max_tokens))
            except httpx.HTTPError:
                if killed_at:
                    during[0] += 1
                await asyncio.sleep(0.5)
                continue
            if killed_at:
                during[r.status_code] += 1
                # requests in flight at the kill may still be answered 200 before the gateway
                # sees the death: recovery is the first 200 after a failure was seen
                if r.status_code == 200 and any(s != 200 for s in during):
                    recovered_at.append(time.monotonic())
                    stop.set()
                if "retry-after" in r.headers:
                    retry_after.add(r.headers["retry-after"])
            if r.status_code != 200:
                await asyncio.sleep(0.5)

    async def killer() -> None:
        await asyncio.sleep(2.0)  # let the clients get going: requests are in flight
        os.kill(child, signal.SIGKILL)
        killed_at.append(time.monotonic())
        await asyncio.sleep(budget)
        stop.set()

    kill = asyncio.ensure_future(killer())
    await asyncio.gather(*(worker(w) for w in range(clients)))
    kill.cancel()
    alive = Path(f"/proc/{gateway_pid}").exists()
    new_child = vllm_child(gateway_pid)
    health = (await client.get("/health")).json()
    return {
        "killed_pid": child,
        "new_vllm_pid": new_child,
        "recovered_s": round(recovered_at[0] - killed_at[0], 1) if recovered_at else None,
        "statuses_after_kill": dict(sorted(during.items())),
        "retry_after_values": sorted(retry_after),
        "gateway_alive": alive,
        "health_after": health,
    }


async def main_async(args: argparse.Namespace, url: str, pid: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        report: dict[str, Any] = {"url": url, "model": model, "max_tokens": args.max_tokens}
        await load(client, model, 1, 3, args.max_tokens)  # warm-up (prefix cache, token texts)
        levels = []
        for c in args.levels:
            run = await load(client, model, c, max(args.per_level, c), args.max_tokens)
            levels.append({"concurrency": c, **run.summary(), "unexpected": run.other[:3]})
            print(json.dumps(levels[-1]), flush=True)
        report["levels"] = levels
        if args.burst:
            report["burst"] = await burst(
                client, model, args.burst, args.burst_rounds, args.max_tokens
            )
            print(json.dumps(report["burst"]), flush=True)
        if args.soak:
            await load(client, model, args.soak_concurrency, 20, args.max_tokens)  # warm-up
            before = rss_kib(pid)
            run = await load(client, model, args.soak_concurrency, args.soak, args.max_tokens)
            after = rss_kib(pid)
            report["soak"] = {
                "concurrency": args.soak_concurrency, **run.summary(),
                "errors": sum(c for s, c in run.statuses.items() if s != 200),
                "rss_before_mib": round(before / 1024, 1), "rss_after_mib": round(after / 1024, 1),
                "rss_growth": round(after / before - 1, 4), "rss_bound": args.rss_bound,
                "unexpected": run.other[:3],
            }  # fmt: skip
            print(json.dumps(report["soak"]), flush=True)
        if args.fault:
            report["fault"] = await fault(
                client, model, pid, args.soak_concurrency, args.max_tokens, args.fault_budget
            )
            print(json.dumps(report["fault"]), flush=True)
        report["metrics"] = [
            line
            for line in (await client.get("/metrics")).text.splitlines()
            if line.startswith(("softspec_admission_rejected", "softspec_engine_",
                                "softspec_admission_wait_seconds_count",
                                "softspec_admission_wait_seconds_sum"))
        ]  # fmt: skip
    return report


def missed(report: dict[str, Any]) -> list[str]:
    out = []
    b = report.get("burst")
    if b and (b["server_errors"] or b["statuses"].get(0)):
        out.append(f"errors in the burst: {b['statuses']}")
    for lv in report.get("levels", []):
        if lv["server_errors"]:
            out.append(f"{lv['server_errors']} 5xx at concurrency {lv['concurrency']}")
    soak = report.get("soak")
    if soak and soak["errors"]:
        out.append(f"{soak['errors']} errors in the soak")
    if soak and soak["rss_growth"] > soak["rss_bound"]:
        out.append(f"gateway RSS grew {soak['rss_growth']:.1%} (bound {soak['rss_bound']:.0%})")
    f = report.get("fault")
    if f and (f.get("recovered_s") is None or not f.get("gateway_alive")):
        out.append(f"no recovery after the vLLM kill: {f}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ensemble", type=Path, help="start `softspec serve` on this ensemble")
    p.add_argument("--url", help="a running gateway instead (needs --pid for RSS and --fault)")
    p.add_argument("--pid", type=int, help="the running gateway's process id")
    p.add_argument("--levels", default="1,2,4,8,16",
                   type=lambda s: [int(x) for x in s.split(",") if x])  # fmt: skip
    p.add_argument("--per-level", type=int, default=24, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--burst", type=int, default=0,
                   help="requests sent at once in the burst phase (e.g. 4x --max-concurrency + "
                   "--max-queue, so some are refused); 0: no burst phase")  # fmt: skip
    p.add_argument("--burst-rounds", type=int, default=3, help="bursts, one after the other")
    p.add_argument("--soak", type=int, default=0, help="requests in the soak phase (e.g. 500)")
    p.add_argument("--soak-concurrency", type=int, default=None,
                   help="clients in the soak and fault phases (default: the gateway's "
                   "--max-concurrency)")  # fmt: skip
    p.add_argument("--rss-bound", type=float, default=0.10, help="allowed RSS growth (0.10)")
    p.add_argument("--fault", action="store_true", help="SIGKILL the vLLM child under load")
    p.add_argument("--fault-budget", type=float, default=600, help="seconds to wait for it")
    p.add_argument("--out", type=Path, help="write the JSON report here too")
    args, serve_args = p.parse_known_args()
    serve_args = [a for a in serve_args if a != "--"]
    if args.soak_concurrency is None:
        conc = "--max-concurrency"
        given = serve_args[serve_args.index(conc) + 1] if conc in serve_args else None
        default = str(Settings.model_fields["max_concurrency"].default)
        args.soak_concurrency = int(given or os.environ.get("SOFTSPEC_MAX_CONCURRENCY", default))
    proc = None
    if args.ensemble is not None:
        from softspec.serving import start_server, stop_server

        log = Path(tempfile.mkdtemp(prefix="softspec-soak-")) / "serve.log"
        t0 = time.monotonic()
        proc, url = start_server(args.ensemble, "vllm", log, serve_args, timeout=900)
        print(f"gateway + vLLM ready in {time.monotonic() - t0:.1f} s (log {log})", flush=True)
        pid = proc.pid
    elif args.url and args.pid:
        url, pid = args.url, args.pid
    else:
        p.error("pass --ensemble, or --url and --pid")
    try:
        report = asyncio.run(main_async(args, url, pid))
    finally:
        if proc is not None:
            stop_server(proc)
    report["missed"] = missed(report)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 1 if report["missed"] else 0


if __name__ == "__main__":
    sys.exit(main())
