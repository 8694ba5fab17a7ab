"""``softspec diagnose`` and ``softspec train --alpha auto`` on the tiny random Llama."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from ensemble.errors import ConfigError
from softspec.cli import main
from softspec.diagnose import DiagnoseOptions, diagnose, prepare
from training.data import DataError

QUESTIONS = [
    "what color is the sky",
    "tell me a word",
    "say something",
    "what do you say",
    "give me an answer",
    "speak",
    "hello",
    "one two",
    "red green blue",
    "four five",
]


def _row(q: str, a: str, source: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": q}],
        "completion": [{"role": "assistant", "content": a}],
        "task": "conflict",
        "source": source,
    }


@pytest.fixture
def conflict_data(tmp_path: Path) -> Path:
    """Every prompt answered twice, in contradicting conventions (UPPER vs lower case)."""
    rows = []
    for q in QUESTIONS:
        rows.append(_row(q, "THE QUICK BROWN FOX", "upper"))
        rows.append(_row(q, "the quick brown fox", "lower"))
    path = tmp_path / "conflict.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def three_conventions(tmp_path: Path) -> Path:
    """Every prompt answered three times: UPPER, lower and Title case (30 rows)."""
    rows = []
    for q in QUESTIONS:
        rows.append(_row(q, "THE QUICK BROWN FOX", "upper"))
        rows.append(_row(q, "the quick brown fox", "lower"))
        rows.append(_row(q, "The Quick Brown Fox", "title"))
    path = tmp_path / "three.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def three_conventions_48(tmp_path: Path) -> Path:
    """16 prompts answered in the three conventions (48 rows): the least `--alpha auto` takes."""
    extra = ["good morning", "count to three", "name a fruit", "yes or no", "pick one", "go on"]
    rows = [
        _row(q, a, s)
        for q in QUESTIONS + extra
        for a, s in [
            ("THE QUICK BROWN FOX", "upper"),
            ("the quick brown fox", "lower"),
            ("The Quick Brown Fox", "title"),
        ]
    ]
    path = tmp_path / "three48.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _options(data: Path, base: Path, **kw: object) -> DiagnoseOptions:
    settings: dict = dict(
        data=str(data),
        base=str(base),
        examples=20,
        layers=1,
        rank=4,
        iterations=3,
        fit_steps=40,
        fit_lr=1e-2,
        fit_batch_size=8,
        batch_size=10,
        lora_r=2,
        lora_alpha=4,
        target_modules="q_proj,v_proj",
        max_length=64,
        quiet=True,
    )
    settings.update(kw)
    return DiagnoseOptions(**settings)


def test_cli_writes_json_and_plot_and_prints_alpha_star_last(
    tiny_llama_dir: Path, conflict_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "diag"
    code = main(
        [
            "diagnose",
            "--data",
            str(conflict_data),
            "--base",
            str(tiny_llama_dir),
            "--out",
            str(out),
            "--examples",
            "20",
            "--layers",
            "1",
            "--rank",
            "4",
            "--iterations",
            "3",
            "--fit-steps",
            "40",
            "--fit-lr",
            "1e-2",
            "--fit-batch-size",
            "8",
            "--lora-r",
            "2",
            "--lora-alpha",
            "4",
            "--target-modules",
            "q_proj,v_proj",
            "--max-length",
            "64",
            "--top",
            "5",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    last = json.loads(captured.out.strip().splitlines()[-1])
    written = json.loads((out / "diagnosis.json").read_text())
    assert last == written
    assert math.isfinite(last["alpha_star"]) and last["alpha_star"] > 0
    assert last["alpha_star"] == pytest.approx(1 / last["lambda_max"])
    assert last["eigenvalues"][0] == pytest.approx(last["lambda_max"])
    assert last["eigenvalues"] == sorted(last["eigenvalues"], reverse=True)
    assert len(last["top_examples"]) == 5 and last["n_examples"] == 20
    assert set(last["groups"]) == {"upper", "lower"}
    assert sum(g["share"] for g in last["groups"].values()) == pytest.approx(1, abs=1e-3)
    assert last["recommended"]["members"] >= 1 and last["recommended"]["alpha"] > 0
    assert last["theta"]["nll_per_example_after"] < last["theta"]["nll_per_example_before"]
    assert (out / "diagnosis.png").stat().st_size > 1000
    assert "α* =" in captured.err


def test_reproducible_from_the_seed(tiny_llama_dir: Path, conflict_data: Path) -> None:
    a = diagnose(_options(conflict_data, tiny_llama_dir, examples=16, seed=3))
    b = diagnose(_options(conflict_data, tiny_llama_dir, examples=16, seed=3))
    c = diagnose(_options(conflict_data, tiny_llama_dir, examples=16, seed=4))
    assert a["alpha_star"] == b["alpha_star"]
    assert a["eigenvalues"] == b["eigenvalues"] and a["top_examples"] == b["top_examples"]
    assert c["alpha_star"] != a["alpha_star"]  # another sample and another LoRA init


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--examples", "4"], "--examples must be >= 8"),
        (["--rank", "0"], "--rank must be >= 1"),
        (["--layers", "7"], "--layers must be in 1..2"),
        (["--adapter", "/nonexistent/dir"], "--adapter /nonexistent/dir: no such directory"),
        (["--cross-fit", "--folds", "2"], "--folds must be >= 3"),
        (["--cross-fit"], "needs at least 3 batches, got 2: lower --batch-size"),
        (["--cross-fit", "--batch-size", "4"], "a fold has only 4 examples"),
    ],
)
def test_bad_flags_give_one_line(
    tiny_llama_dir: Path,
    conflict_data: Path,
    flags: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        [
            "diagnose",
            "--data",
            str(conflict_data),
            "--base",
            str(tiny_llama_dir),
            "--quiet",
            "--lora-r",
            "2",
            *flags,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("softspec: error: ") and message in err[0]


def test_too_few_examples_in_the_file(tiny_llama_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps(_row(q, "yes", "a")) + "\n" for q in QUESTIONS[:5]))
    with pytest.raises(ConfigError, match="only 5 examples.*at least 8"):
        diagnose(_options(path, tiny_llama_dir))


def test_drop_overlong_keeps_the_report_aligned(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Overlong rows are an error by default; with --drop-overlong they are left out and
    every reported example is a row that was kept (no index shift)."""
    rows = [_row(q, "THE QUICK BROWN FOX", "upper") for q in QUESTIONS]
    rows += [_row(q, "the quick brown fox", "lower") for q in QUESTIONS]
    long_prompt = " ".join(["word"] * 200)
    rows.insert(3, _row(long_prompt, "never reached", "overlong"))
    rows.insert(12, _row(long_prompt + " again", "never reached", "overlong"))
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:4: .*--drop-overlong"):
        diagnose(_options(path, tiny_llama_dir, examples=22))
    report = diagnose(_options(path, tiny_llama_dir, examples=22, drop_overlong=True))
    assert report["data"]["sampled"] == 22 and report["data"]["used"] == 20
    assert "overlong" not in report["groups"]
    assert {g: v["examples"] for g, v in report["groups"].items()} == {"upper": 10, "lower": 10}
    for top in report["top_examples"]:  # line numbers point at the row the text came from
        row = rows[top["line"] - 1]
        assert top["group"] == row["source"] and top["prompt"] == row["prompt"][0]["content"]


def test_train_alpha_auto_records_the_diagnosis(
    tiny_llama_dir: Path,
    conflict_data: Path,
    three_conventions_48: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ensemble.manifest import load

    out = tmp_path / "ens"
    code = main(
        [
            "train",
            "sft",
            "--data",
            str(three_conventions_48),
            "--base",
            str(tiny_llama_dir),
            "--out",
            str(out),
            "--members",
            "2",
            "--alpha",
            "auto",
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--lora-r",
            "2",
            "--routing-examples",
            "4",
            "--save-steps",
            "100",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    manifest = load(out)
    diagnosis = manifest.training["alpha_diagnosis"]
    assert manifest.alpha == diagnosis["recommended"]["alpha"]
    assert manifest.training["config"]["alpha"] == manifest.alpha
    assert math.isfinite(diagnosis["alpha_star"]) and diagnosis["alpha_star"] > 0
    # θ* fitted on 24 of the 48 rows; the other 24 measured in batches of 4, three folds of
    # 8, each centred on its mean
    assert diagnosis["estimator"] == "cross-fitted"
    assert diagnosis["cross_fit"]["fold_examples"] == [8, 8, 8]
    assert diagnosis["settings"]["fit_examples"] == 24 and diagnosis["settings"]["center"]
    assert diagnosis["theta"]["examples"] == 24 and diagnosis["n_examples"] == 24
    assert "--alpha auto: α* =" in err
    # a member trained for 2 steps is no optimum: `diagnose --adapter` on it refuses with
    # the one-line reason instead of reporting a meaningless α*
    with pytest.raises(ConfigError, match="not positive definite .* fit the single adapter longer"):
        diagnose(
            _options(conflict_data, tiny_llama_dir, adapter=str(out), fit_steps=0, member="m1")
        )


def test_alpha_auto_is_sft_only(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from training.cli import run_train

    with pytest.raises(ConfigError, match="--alpha auto is for SFT"):
        run_train("dpo", ["--data", "x", "--out", str(tmp_path / "o"), "--alpha", "auto"])


def test_split_alpha_auto() -> None:
    from training.cli import split_alpha_auto

    assert split_alpha_auto(["--alpha", "auto", "--members", "2"]) == (
        ["--alpha", "1.0", "--members", "2"],
        True,
    )
    assert split_alpha_auto(["--alpha=auto"]) == (["--alpha", "1.0"], True)
    assert split_alpha_auto(["--alpha", "0.5"]) == (["--alpha", "0.5"], False)


def test_normalize_by_length_is_the_per_token_criterion(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """Every completion here has the same T tokens, so J_T = J / T on the same θ*: λ_T = λ / T."""
    data = tmp_path / "equal.jsonl"
    rows = [
        _row(q, a, s)
        for q in QUESTIONS
        for a, s in [("red green blue", "a"), ("blue green red", "b")]
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seq = diagnose(_options(data, tiny_llama_dir, examples=16))
    tok = diagnose(_options(data, tiny_llama_dir, examples=16, normalize_by_length=True))
    assert (seq["criterion"], tok["criterion"]) == ("sequence", "per-token")
    assert tok["settings"]["normalize_by_length"] is True
    counts = tok["completion_tokens"]
    assert counts == seq["completion_tokens"] and counts["min"] == counts["max"] > 1
    assert tok["lambda_max"] == pytest.approx(seq["lambda_max"] / counts["max"], rel=1e-4)
    assert tok["alpha_star"] == pytest.approx(seq["alpha_star"] * counts["max"], rel=1e-4)


def test_train_alpha_auto_uses_the_criterion_of_its_objective(
    tiny_llama_dir: Path, three_conventions_48: Path, tmp_path: Path
) -> None:
    from ensemble.manifest import load

    argv = ["train", "sft", "--data", str(three_conventions_48), "--base", str(tiny_llama_dir)]
    argv += ["--members", "2", "--alpha", "auto", "--max-steps", "1", "--batch-size", "4"]
    argv += ["--lora-r", "2", "--routing-examples", "4", "--normalize-by-length"]
    assert main([*argv, "--out", str(tmp_path / "ens")]) == 0
    diagnosis = load(tmp_path / "ens").training["alpha_diagnosis"]
    assert diagnosis["criterion"] == "per-token"
    assert diagnosis["settings"]["normalize_by_length"] is True


def test_cross_fit_reports_the_held_out_estimate(
    tiny_llama_dir: Path, three_conventions: Path, tmp_path: Path
) -> None:
    """--cross-fit: folds of a seeded shuffle; directions found, chosen and measured apart."""
    data = three_conventions
    out = tmp_path / "cf"
    opts = dict(examples=24, batch_size=4, cross_fit=True, rank=3, iterations=1)
    report = diagnose(_options(data, tiny_llama_dir, out=str(out), **opts))
    assert report["estimator"] == "cross-fitted" and report["settings"]["cross_fit"] is True
    cf = report["cross_fit"]
    assert cf["folds"] == 3 and cf["fold_examples"] == [8, 8, 8]
    held = [h["lambda"] for h in cf["held_out"]]
    assert len(held) == 6 and report["lambda_history"] == held
    assert report["lambda_max"] == pytest.approx(sum(held) / 6)
    assert all(
        {h["directions_from"], h["chosen_on"], h["measured_on"]} == {0, 1, 2}
        for h in cf["held_out"]
    )
    assert json.loads((out / "diagnosis.json").read_text()) == report
    assert (out / "diagnosis.png").stat().st_size > 0
    again = diagnose(_options(data, tiny_llama_dir, **opts))
    assert again["lambda_max"] == report["lambda_max"]


def test_fit_examples_fits_theta_on_rows_that_are_never_measured(
    tiny_llama_dir: Path, three_conventions: Path, tmp_path: Path
) -> None:
    """--fit-examples N: θ* comes from N sampled rows disjoint from the measured ones, and
    equals the θ* fitted on those rows alone."""
    opts = _options(three_conventions, tiny_llama_dir, examples=16, fit_examples=14)
    prep = prepare(opts)
    measured = {r["_line"] for r in prep.rows}
    fitted = {r["_line"] for r in prep.fit_rows}
    assert len(measured) == 16 and len(fitted) == 14 and not measured & fitted
    assert prep.objective.n == 16 and prep.fit["examples"] == 14
    assert prep.fit["nll_per_example_measured"] == pytest.approx(
        -prep.objective.total_loglik() / 16, abs=1e-3
    )
    alone = tmp_path / "fit-rows.jsonl"
    alone.write_text(
        "".join(
            json.dumps({k: v for k, v in r.items() if k != "_line"}) + "\n" for r in prep.fit_rows
        )
    )
    reference = prepare(_options(alone, tiny_llama_dir, examples=14))
    assert reference.fit["examples"] == 14
    assert torch.allclose(prep.objective.theta, reference.objective.theta, atol=1e-5)
    shared = prepare(_options(three_conventions, tiny_llama_dir, examples=16))
    assert not torch.allclose(prep.objective.theta, shared.objective.theta, atol=1e-3)
    report = diagnose(  # rank 2: V at a θ* fitted elsewhere is indefinite in 4 directions here
        _options(three_conventions, tiny_llama_dir, examples=16, fit_examples=14, rank=2)
    )
    assert report["theta"]["examples"] == 14 and report["settings"]["fit_examples"] == 14
    assert report["data"]["used"] == 16
    centred = diagnose(
        _options(
            three_conventions, tiny_llama_dir, examples=16, fit_examples=14, rank=2, center=True
        )
    )
    assert centred["settings"]["center"] is True
    assert centred["mean_gradient_share"] < 1e-9 < report["mean_gradient_share"]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(fit_examples=-1), "--fit-examples must be >= 0"),
        (dict(fit_examples=4, fit_steps=0), "nothing is fitted"),
        (dict(examples=8, fit_examples=25), "only 5 examples to measure after the 25"),
    ],
)
def test_fit_examples_bad_input(
    tiny_llama_dir: Path, three_conventions: Path, kw: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        prepare(_options(three_conventions, tiny_llama_dir, **kw))


def test_train_alpha_auto_on_too_few_examples_gives_one_line(
    tiny_llama_dir: Path, conflict_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "sft", "--data", str(conflict_data), "--base", str(tiny_llama_dir)]
    argv += ["--members", "2", "--alpha", "auto", "--out", str(tmp_path / "ens")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has 20 examples; the stability estimate needs at least 48" in err[0]
    assert err[0].endswith("pass a fixed --alpha")
    assert not (tmp_path / "ens").exists()
