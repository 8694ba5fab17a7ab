"""The lock-step processor on synthetic logits, against a brute-force mixture (numpy)."""

from __future__ import annotations

import re
import warnings
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from server.lockstep import LockstepArgsError, parse_args, vllm_flags, xargs
from server.mixture_torch import nucleus

with warnings.catch_warnings():  # vLLM's imports touch torch.jit (deprecated in torch 2.13)
    warnings.simplefilter("ignore", DeprecationWarning)
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from server.lockstep_vllm import Book, LockstepProcessor

V = 50
ABORT = 7


def _args(group: str, index: int, size: int, weight: float = 1.0, **kw: Any) -> Any:
    kw = {"temperature": 0.0, "top_p": 1.0, "seed": None, "abort": ABORT, **kw}
    return parse_args(xargs(group, index, size, weight, **kw))


def _mixture(logits: np.ndarray, weights: list[float]) -> np.ndarray:
    """Brute force: log Σ_k π_k softmax(logits_k), with π normalised."""
    x = logits.astype(np.float64)
    q = np.exp(x - x.max(axis=1, keepdims=True))
    q /= q.sum(axis=1, keepdims=True)
    pi = np.asarray(weights) / np.sum(weights)
    return np.log(pi @ q)


def _forced(row: torch.Tensor) -> int:
    """The token a forced row can only sample (all other logits -inf)."""
    finite = torch.isfinite(row).nonzero().flatten().tolist()
    assert len(finite) == 1, f"row not forced: {len(finite)} finite logits"
    return int(finite[0])


def test_a_complete_group_gets_the_mixture_argmax_in_every_row_and_other_rows_are_untouched() -> (
    None
):
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(4, V)).astype(np.float32) * 3
    weights = [0.5, 0.3, 0.2]
    book = Book()
    outputs: list[list[int]] = [[], [], [], []]
    for i in range(3):
        book.add(i, _args("g", i, 3, weights[i]), outputs[i])
    book.add(3, None, outputs[3])  # an ordinary request in the same batch
    logits = torch.tensor(raw)
    book.apply(logits)
    expected = int(np.argmax(_mixture(raw[:3], weights)))
    assert [_forced(logits[i]) for i in range(3)] == [expected] * 3
    assert torch.equal(logits[3], torch.tensor(raw[3]))
    # the members disagree here, so the mixture is not just member 0's choice
    assert len({int(np.argmax(raw[i])) for i in range(3)}) > 1


def test_the_weights_decide_between_two_members() -> None:
    raw = np.full((2, V), -5.0, dtype=np.float32)
    raw[0, 3], raw[1, 4] = 5.0, 5.0  # member 0 wants token 3, member 1 token 4
    for weights, want in (([0.7, 0.3], 3), ([0.3, 0.7], 4)):
        book = Book()
        for i in range(2):
            book.add(i, _args("g", i, 2, weights[i]), [])
        logits = torch.tensor(raw)
        book.apply(logits)
        assert _forced(logits[0]) == _forced(logits[1]) == want


def test_rows_decide_their_position_and_a_late_row_gets_the_groups_token() -> None:
    rng = np.random.default_rng(1)
    book = Book()
    outs: list[list[int]] = [[], [], []]
    for i in range(3):
        book.add(i, _args("g", i, 3), outs[i])
    path = []
    for _ in range(4):  # four steps in lock-step
        raw = rng.normal(size=(3, V)).astype(np.float32) * 3
        logits = torch.tensor(raw)
        book.apply(logits)
        tok = int(np.argmax(_mixture(raw, [1, 1, 1])))
        assert [_forced(logits[i]) for i in range(3)] == [tok] * 3
        path.append(tok)
        for o in outs:
            o.append(tok)
    # a row re-run from position 1 (e.g. after a preemption) is forced onto the same path
    book2_out = path[:1]
    book.add(5, _args("g", 1, 3), book2_out)
    logits = torch.tensor(rng.normal(size=(6, V)).astype(np.float32))
    book.remove(0), book.remove(1), book.remove(2)
    book.apply(logits)
    assert _forced(logits[5]) == path[1]


def test_an_incomplete_group_is_aborted_and_the_late_members_stop_at_the_same_place() -> None:
    book = Book()
    outs: list[list[int]] = [[], [], []]
    book.add(0, _args("g", 0, 3), outs[0])
    book.add(1, _args("g", 1, 3), outs[1])  # member 2 is not in this step
    logits = torch.randn(2, V)
    book.apply(logits)
    assert _forced(logits[0]) == _forced(logits[1]) == ABORT
    book.remove(0), book.remove(1)
    book.add(0, _args("g", 2, 3), outs[2])  # member 2 arrives one step later
    logits = torch.randn(1, V)
    book.apply(logits)
    assert _forced(logits[0]) == ABORT


def test_rows_of_one_group_at_different_positions_abort() -> None:
    book = Book()
    book.add(0, _args("g", 0, 2), [11])  # one step ahead
    book.add(1, _args("g", 1, 2), [])
    logits = torch.randn(2, V)
    book.apply(logits)
    assert _forced(logits[0]) == _forced(logits[1]) == ABORT


def test_concurrent_groups_do_not_mix() -> None:
    rng = np.random.default_rng(2)
    raw = rng.normal(size=(4, V)).astype(np.float32) * 4
    book = Book()
    book.add(0, _args("a", 0, 2), [])
    book.add(2, _args("a", 1, 2), [])
    book.add(1, _args("b", 0, 2, 0.9), [])
    book.add(3, _args("b", 1, 2, 0.1), [])
    logits = torch.tensor(raw)
    book.apply(logits)
    a = int(np.argmax(_mixture(raw[[0, 2]], [1, 1])))
    b = int(np.argmax(_mixture(raw[[1, 3]], [0.9, 0.1])))
    assert (_forced(logits[0]), _forced(logits[2])) == (a, a)
    assert (_forced(logits[1]), _forced(logits[3])) == (b, b)


def _brute_nucleus(logq: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    p = np.exp((logq - logq.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep, mass = [], 0.0
    for j in order:
        keep.append(j)
        mass += p[j]
        if mass >= top_p:
            break
    out = np.zeros_like(p)
    out[keep] = p[keep]
    return out / out.sum()


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9), (2.0, 0.5)])
def test_nucleus_matches_brute_force(temperature: float, top_p: float) -> None:
    logq = np.log(np.random.default_rng(3).dirichlet(np.ones(V) * 0.3))
    got = nucleus(torch.tensor(logq), temperature, top_p).numpy()
    np.testing.assert_allclose(got, _brute_nucleus(logq, temperature, top_p), atol=1e-12)


def _sampled_path(seed: int | None, steps: int, temperature: float, top_p: float) -> list[int]:
    rng = np.random.default_rng(4)  # the same logits for every call
    book = Book()
    outs: list[list[int]] = [[], []]
    for i in range(2):
        book.add(i, _args("g", i, 2, temperature=temperature, top_p=top_p, seed=seed), outs[i])
    for _ in range(steps):
        logits = torch.tensor(rng.normal(size=(2, V)).astype(np.float32))
        book.apply(logits)
        tok = _forced(logits[0])
        assert _forced(logits[1]) == tok
        for o in outs:
            o.append(tok)
    return outs[0]


def test_sampling_follows_the_seed_and_the_nucleus() -> None:
    a = _sampled_path(5, 40, 1.0, 1.0)
    assert a == _sampled_path(5, 40, 1.0, 1.0)
    assert a != _sampled_path(6, 40, 1.0, 1.0)
    # the same draws as a brute-force sampler with one seeded generator per group
    rng = np.random.default_rng(4)
    gen = torch.Generator().manual_seed(5)
    want = []
    for _ in range(40):
        raw = rng.normal(size=(2, V)).astype(np.float32)
        probs = torch.tensor(_brute_nucleus(_mixture(raw, [1, 1]), 1.0, 1.0))
        want.append(int(torch.multinomial(probs, 1, generator=gen)))
    assert a == want
    # a tiny nucleus keeps only the mixture's most likely token
    rng = np.random.default_rng(4)
    tops = [int(np.argmax(_mixture(rng.normal(size=(2, V)), [1, 1]))) for _ in range(20)]
    assert _sampled_path(9, 20, 1.0, 1e-9) == tops


def test_the_processor_follows_vllms_batch_updates() -> None:
    proc = LockstepProcessor(None, torch.device("cpu"), False)
    assert proc.is_argmax_invariant() is False

    def params(group: str, index: int) -> SimpleNamespace:
        return SimpleNamespace(extra_args=xargs(group, index, 2, 1.0, temperature=0.0,
                                                top_p=1.0, seed=None, abort=ABORT))  # fmt: skip

    out = [[], [], []]  # type: ignore[var-annotated]
    added = [(0, params("g", 0), [1], out[0]), (1, SimpleNamespace(extra_args=None), [1], out[1]),
             (2, params("g", 1), [1], out[2])]  # fmt: skip
    proc.update_state(BatchUpdate(3, removed=[], added=added, moved=[]))
    # row 2 moves to 1 (vLLM condenses the batch after removing row 1)
    proc.update_state(
        BatchUpdate(2, removed=[1], added=[], moved=[(2, 1, MoveDirectionality.UNIDIRECTIONAL)])
    )
    raw = torch.randn(2, V)
    logits = proc.apply(raw.clone())
    tok = int(np.argmax(_mixture(raw.numpy(), [1, 1])))
    assert _forced(logits[0]) == _forced(logits[1]) == tok
    # a swap exchanges two rows' states
    proc.book.rows[0].output.append(tok)
    proc.update_state(BatchUpdate(2, removed=[], added=[], moved=[(0, 1, MoveDirectionality.SWAP)]))
    assert proc.book.rows[1].args.index == 0 and proc.book.rows[0].args.index == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"softspec_index": 3}, "softspec_index must be in [0, 3)"),
        ({"softspec_weight": 0.0}, "softspec_weight must be > 0"),
        ({"softspec_top_p": 0.0}, "softspec_top_p must be in (0, 1]"),
        ({"softspec_size": 0}, "softspec_size must be in [1, 64]"),
        ({"softspec_group": ""}, "softspec_group must be a non-empty string"),
        ({"softspec_index": 1.5}, "softspec_index must be a finite int"),
        ({"softspec_temperature": -1.0}, "softspec_temperature must be >= 0"),
        ({"softspec_abort": "x"}, "softspec_abort must be a finite int"),
    ],
)
def test_malformed_lockstep_args_are_one_clear_error(change: dict[str, Any], message: str) -> None:
    extra = {**xargs("g", 0, 3, 1.0, temperature=0.0, top_p=1.0, seed=None, abort=1), **change}
    with pytest.raises(LockstepArgsError, match=re.escape(message)):
        parse_args(extra)
    with pytest.raises(ValueError, match="softspec_"):
        LockstepProcessor.validate_params(SimpleNamespace(extra_args=extra))


def test_partial_lockstep_args_name_what_is_missing_and_other_requests_pass() -> None:
    with pytest.raises(LockstepArgsError, match="miss.*softspec_size"):
        parse_args({"softspec_group": "g", "softspec_index": 0})
    assert parse_args({"other": 1}) is None and parse_args(None) is None
    LockstepProcessor.validate_params(SimpleNamespace(extra_args=None))


def test_vllm_flags_turn_chunked_prefill_off_and_fit_a_group_in_one_step() -> None:
    flags = vllm_flags(4, 2048)
    assert flags[flags.index("--max-num-batched-tokens") + 1] == str(4 * 2048)
    assert "--no-enable-chunked-prefill" in flags
    assert flags[flags.index("--logits-processors") + 1] == "server.lockstep_vllm:LockstepProcessor"


class _Req(SimpleNamespace):
    pass


def _request(rid: str, group: str, index: int, size: int) -> _Req:
    extra = xargs(group, index, size, 1.0, temperature=0.0, top_p=1.0, seed=None, abort=ABORT)
    return _Req(request_id=rid, sampling_params=SimpleNamespace(extra_args=extra))


@pytest.fixture
def scheduler(monkeypatch: pytest.MonkeyPatch) -> Any:
    """GroupScheduler over a stand-in for vLLM's Scheduler (the seam: its queue methods)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    from server.lockstep_vllm import GroupScheduler

    queued: list[str] = []
    finished: list[Any] = []
    monkeypatch.setattr(Scheduler, "add_request", lambda self, r: queued.append(r.request_id))
    monkeypatch.setattr(Scheduler, "schedule", lambda self, *a, **k: "scheduled")
    monkeypatch.setattr(Scheduler, "get_num_unfinished_requests", lambda self: len(queued))
    monkeypatch.setattr(Scheduler, "finish_requests",
                        lambda self, ids, status: finished.append(ids) or [])  # fmt: skip
    sched = GroupScheduler.__new__(GroupScheduler)
    sched.requests = {}
    sched._held = {}
    return SimpleNamespace(s=sched, queued=queued, finished=finished)


def test_the_scheduler_queues_a_group_only_when_it_is_complete_in_member_order(scheduler) -> None:  # type: ignore[no-untyped-def]
    s = scheduler.s
    s.add_request(_Req(request_id="plain", sampling_params=SimpleNamespace(extra_args=None)))
    s.add_request(_request("b2", "b", 2, 3))
    s.add_request(_request("b0", "b", 0, 3))
    assert scheduler.queued == ["plain"]  # the group waits for its third member
    assert s.get_num_unfinished_requests() == 3  # held ones keep the engine stepping
    s.add_request(_request("b1", "b", 1, 3))
    assert scheduler.queued == ["plain", "b0", "b1", "b2"]
    assert s.get_num_unfinished_requests() == 4 and not s._held


def test_the_scheduler_releases_an_overdue_group_and_drops_aborted_members(scheduler) -> None:  # type: ignore[no-untyped-def]
    s = scheduler.s
    s.add_request(_request("a0", "a", 0, 2))  # its partner never comes
    s.add_request(_request("c0", "c", 0, 3))
    s.add_request(_request("c1", "c", 1, 3))
    s.finish_requests(iter(["c1", "x"]), "aborted")  # an iterator: read once, passed on
    assert scheduler.finished == [{"c1", "x"}]
    assert [r.request_id for r in s._held["c"][2]] == ["c0"]
    s.finish_requests("c0", "aborted")
    assert "c" not in s._held
    since, size, reqs = s._held["a"]
    s._held["a"] = (since - s.HOLD_S - 1, size, reqs)  # past the hold
    assert s.schedule() == "scheduled"
    assert scheduler.queued == ["a0"] and not s._held  # released incomplete: it will abort
