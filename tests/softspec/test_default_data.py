"""The default datasets: schema, coverage, disjoint splits, determinism and atomic building.

One build (seed 0) is shared by the module; the determinism tests build two more.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import ensemble.jsonl
from ensemble.errors import AssetError, ConfigError, DataError
from softspec import default_data as dd
from softspec.default_data import (
    CONFLICT_SOURCES,
    DPO_SOURCES,
    HELD_OUT_TOPICS,
    build_datasets,
    datasets,
    format_summary,
    read_jsonl,
    sources,
)
from softspec.default_data import build as build_module

SFT_TOPICS = ("sft_topics_train.jsonl", "sft_topics_val.jsonl", "sft_topics_test.jsonl")
SFT_CONFLICT = ("sft_conflict_train.jsonl", "sft_conflict_test.jsonl")
DPO = ("dpo_chitchat_train.jsonl", "dpo_chitchat_test.jsonl")
SFT_FILES = (*SFT_TOPICS, "ood.jsonl", "eval_ood.jsonl", *SFT_CONFLICT)
JSONL_FILES = (*SFT_FILES, *DPO)

Rows = dict[str, list[dict[str, Any]]]


def normalise(text: str) -> str:
    """The spec's prompt identity, re-implemented so the module cannot grade itself."""
    return " ".join(text.strip().split()).casefold()


def dump(row: dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=True)


def first_prompt(row: dict[str, Any]) -> str:
    return normalise(row["prompt"][0]["content"])


def pair_key(row: dict[str, Any]) -> tuple[str, ...]:
    replies = sorted(normalise(row[k][0]["content"]) for k in ("chosen", "rejected"))
    return (first_prompt(row), *replies)


def english_topics() -> set[str]:
    spec = importlib.util.find_spec("chatterbot_corpus")
    assert spec is not None and spec.submodule_search_locations
    root = Path(next(iter(spec.submodule_search_locations))) / "data" / "english"
    return {p.stem for p in root.glob("*.yml")}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("seed0") / "data"
    return out, build_datasets(out, seed=0)


@pytest.fixture(scope="module")
def rows(built: tuple[Path, dict[str, Any]]) -> Rows:
    out, _ = built
    return {name: read_jsonl(out / name) for name in JSONL_FILES}


# --------------------------------------------------------------------------- files and schema


def test_directory_holds_every_file_and_the_summary_counts_them(
    built: tuple[Path, dict[str, Any]], rows: Rows
) -> None:
    out, summary = built
    assert {p.name for p in out.iterdir()} == {*JSONL_FILES, "data.json", "README.md"}
    assert json.loads((out / "data.json").read_text(encoding="utf-8")) == summary
    assert summary["files"] == {name: len(rows[name]) for name in JSONL_FILES}
    assert all(rows[name] for name in JSONL_FILES)
    assert summary["format_version"] == dd.FORMAT_VERSION and summary["seed"] == 0
    assert set(summary["sources"]) == {"chatterbot-corpus", "chitchat-dataset"}
    assert "ood.jsonl" in (out / "README.md").read_text(encoding="utf-8")


def check_message(message: Any, role: str) -> None:
    assert isinstance(message, dict) and message["role"] == role
    assert isinstance(message["content"], str) and message["content"].strip()


def check_sft_row(row: dict[str, Any], sources: Callable[[str], bool]) -> None:
    assert {"prompt", "completion", "task", "source", "ood"} <= row.keys()
    assert isinstance(row["prompt"], list) and len(row["prompt"]) % 2 == 1
    for i, message in enumerate(row["prompt"]):
        check_message(message, "user" if i % 2 == 0 else "assistant")
    assert isinstance(row["completion"], list) and len(row["completion"]) == 1
    check_message(row["completion"][0], "assistant")
    assert isinstance(row["task"], str) and row["task"]
    assert isinstance(row["ood"], bool)
    assert sources(row["source"]), row["source"]


SFT_SOURCES: dict[str, Callable[[str], bool]] = {
    "sft_topics": lambda s: s == "chatterbot/english",
    "ood": lambda s: s.startswith("chatterbot/") and s != "chatterbot/english",
    "eval_ood": lambda s: s.startswith("chatterbot/"),
    "sft_conflict": lambda s: s in CONFLICT_SOURCES,
}


@pytest.mark.parametrize("name", SFT_FILES)
def test_sft_rows_are_trl_prompt_completion(rows: Rows, name: str) -> None:
    sources = next(v for k, v in SFT_SOURCES.items() if name.startswith(k))
    for row in rows[name]:
        check_sft_row(row, sources)


@pytest.mark.parametrize("name", DPO)
def test_dpo_rows_are_trl_preferences(rows: Rows, name: str) -> None:
    for row in rows[name]:
        assert {"prompt", "chosen", "rejected", "source", "conflict", "task"} <= row.keys()
        assert len(row["prompt"]) == 1 and len(row["chosen"]) == len(row["rejected"]) == 1
        check_message(row["prompt"][0], "user")
        check_message(row["chosen"][0], "assistant")
        check_message(row["rejected"][0], "assistant")
        assert normalise(row["chosen"][0]["content"]) != normalise(row["rejected"][0]["content"])
        assert len(row["chosen"][0]["content"]) <= sources.REPLY_MAX_CHARS
        assert row["source"] in DPO_SOURCES and row["task"] == "chitchat"
        assert isinstance(row["conflict"], bool)


# --------------------------------------------------------------------------- coverage


def test_sft_topics_cover_every_in_distribution_topic(rows: Rows) -> None:
    expected = english_topics() - set(HELD_OUT_TOPICS)
    assert set(HELD_OUT_TOPICS) <= english_topics()
    all_rows = [r for name in SFT_TOPICS for r in rows[name]]
    assert {r["task"] for r in all_rows} == expected
    assert not any(r["ood"] for r in all_rows)
    assert max(Counter(r["task"] for r in all_rows).values()) <= datasets.TOPIC_CAP


def test_splittable_tasks_appear_in_every_split(rows: Rows) -> None:
    all_rows = [r for name in SFT_TOPICS for r in rows[name]]
    sizes = Counter(r["task"] for r in all_rows)
    prompts = {t: {first_prompt(r) for r in all_rows if r["task"] == t} for t in sizes}
    splittable = {t for t in sizes if sizes[t] >= 10 and len(prompts[t]) >= 3}
    assert len(splittable) >= 10
    for name in SFT_TOPICS:
        assert splittable <= {r["task"] for r in rows[name]}, name


def test_split_sizes_are_roughly_80_10_10(rows: Rows) -> None:
    train, val, test = (len(rows[name]) for name in SFT_TOPICS)
    total = train + val + test
    assert 0.7 < train / total < 0.9
    assert 0.05 < val / total < 0.15 and 0.05 < test / total < 0.15


def test_held_out_topics_stay_out_of_sft_topics(rows: Rows) -> None:
    for name in SFT_TOPICS:
        assert not {r["task"] for r in rows[name]} & set(HELD_OUT_TOPICS)
    known = {
        normalise(m["content"])
        for name in SFT_TOPICS
        for row in rows[name]
        for m in row["prompt"]
        if m["role"] == "user"
    }
    assert not any(first_prompt(r) in known for r in rows["ood.jsonl"])


def test_ood_spans_languages_and_held_out_topics(rows: Rows) -> None:
    ood = rows["ood.jsonl"]
    assert all(r["ood"] is True for r in ood)
    tasks = Counter(r["task"] for r in ood)
    languages = {t for t in tasks if t.startswith("lang:")}
    assert len(languages) >= 20 and "lang:english" not in languages
    assert max(tasks[t] for t in languages) <= datasets.OOD_PER_LANGUAGE
    assert set(HELD_OUT_TOPICS) <= set(tasks)
    for row in ood:
        expected = "chatterbot/english-heldout" if row["task"] in HELD_OUT_TOPICS else None
        assert row["source"] == (expected or f"chatterbot/{row['task'].removeprefix('lang:')}")


def test_eval_ood_mixes_the_test_split_with_as_many_ood_rows(rows: Rows) -> None:
    mix = rows["eval_ood.jsonl"]
    labels = Counter(r["ood"] for r in mix)
    test = rows["sft_topics_test.jsonl"]
    assert labels[False] == labels[True] == len(test)
    assert sorted(dump(r) for r in mix if not r["ood"]) == sorted(dump(r) for r in test)
    ood = {dump(r) for r in rows["ood.jsonl"]}
    assert all(dump(r) in ood for r in mix if r["ood"])
    picked = {r["task"] for r in mix if r["ood"]}
    assert len(picked) >= 20 and set(HELD_OUT_TOPICS) <= picked
    assert [r["ood"] for r in mix] != sorted(r["ood"] for r in mix)  # shuffled


def test_sft_conflict_has_one_upper_and_one_lower_answer_per_prompt(rows: Rows) -> None:
    for name in SFT_CONFLICT:
        by_prompt: dict[str, list[dict[str, Any]]] = {}
        for row in rows[name]:
            by_prompt.setdefault(first_prompt(row), []).append(row)
        for prompt, pair in by_prompt.items():
            assert sorted(r["source"] for r in pair) == sorted(CONFLICT_SOURCES), prompt
            upper, lower = sorted(pair, key=lambda r: r["source"] != "upper")
            a, b = upper["completion"][0]["content"], lower["completion"][0]["content"]
            assert a != b and a == a.upper() and b == b.lower(), prompt
            assert upper["prompt"] == lower["prompt"] and upper["task"] == lower["task"]
            assert upper["task"].startswith("conflict:") and not upper["ood"]
            assert upper["task"].removeprefix("conflict:") not in HELD_OUT_TOPICS


def test_dpo_has_both_sources_and_many_conflicts(
    built: tuple[Path, dict[str, Any]], rows: Rows
) -> None:
    _, summary = built
    all_rows = [r for name in DPO for r in rows[name]]
    sources = Counter(r["source"] for r in all_rows)
    assert set(sources) == set(DPO_SOURCES) and min(sources.values()) > 1000
    conflicts = [r for r in all_rows if r["conflict"]]
    assert len(conflicts) > 100
    assert summary["dpo"]["conflict_pairs"] * 2 == len(conflicts)
    assert summary["dpo"]["rows_per_source"] == dict(sources)
    by_pair: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in conflicts:
        by_pair.setdefault(pair_key(row), []).append(row)
    for pair in by_pair.values():  # the two raters' criteria choose opposite replies
        assert sorted(r["source"] for r in pair) == sorted(DPO_SOURCES)
        assert pair[0]["chosen"] == pair[1]["rejected"] and pair[0]["rejected"] == pair[1]["chosen"]


# --------------------------------------------------------------------------- splits


def disjoint(groups: list[set[Any]]) -> bool:
    return sum(len(g) for g in groups) == len(set().union(*groups))


def test_splits_do_not_share_prompts_or_pairs(rows: Rows) -> None:
    assert disjoint([{first_prompt(r) for r in rows[name]} for name in SFT_TOPICS])
    assert disjoint([{first_prompt(r) for r in rows[name]} for name in SFT_CONFLICT])
    assert disjoint([{pair_key(r) for r in rows[name]} for name in DPO])


# --------------------------------------------------------------------------- determinism


def file_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_same_seed_gives_byte_identical_files(
    built: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, _ = built
    build_datasets(tmp_path / "again", seed=0)
    assert file_bytes(tmp_path / "again") == file_bytes(out)


def test_another_seed_gives_other_splits(
    built: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, _ = built
    summary = build_datasets(tmp_path / "seed1", seed=1)
    assert summary["seed"] == 1
    for name in ("sft_topics_test.jsonl", "sft_conflict_test.jsonl", "dpo_chitchat_test.jsonl"):
        assert (tmp_path / "seed1" / name).read_bytes() != (out / name).read_bytes(), name


# --------------------------------------------------------------------------- building


def test_a_second_build_returns_the_summary_without_rewriting(
    built: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, summary = built
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def rebuild(seed: int) -> None:
        raise AssertionError("rebuilt an up-to-date directory")

    monkeypatch.setattr(build_module, "_datasets", rebuild)
    assert build_datasets(out, seed=0) == summary
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_another_seed_needs_force_to_replace(
    built: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out = tmp_path / "data"
    shutil.copytree(built[0], out)
    with pytest.raises(ConfigError, match="force"):
        build_datasets(out, seed=3)
    assert json.loads((out / "data.json").read_text(encoding="utf-8"))["seed"] == 0
    assert build_datasets(out, seed=3, force=True)["seed"] == 3
    assert json.loads((out / "data.json").read_text(encoding="utf-8"))["seed"] == 3


def failing_writer(monkeypatch: pytest.MonkeyPatch, after: int) -> None:
    """Make the JSONL writer raise once ``after`` files were written."""
    real, calls = build_module._write_jsonl, list[Path]()

    def write(path: Path, rows: Any) -> None:
        if len(calls) == after:
            raise OSError("disk full (simulated)")
        calls.append(path)
        real(path, rows)

    monkeypatch.setattr(build_module, "_write_jsonl", write)


def test_a_failed_build_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing_writer(monkeypatch, after=3)
    with pytest.raises(OSError, match="simulated"):
        build_datasets(tmp_path / "data", seed=0)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_forced_rebuild_keeps_the_old_directory(
    built: tuple[Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "data"
    shutil.copytree(built[0], out)
    before = file_bytes(out)
    failing_writer(monkeypatch, after=5)
    with pytest.raises(OSError, match="simulated"):
        build_datasets(out, seed=0, force=True)
    assert file_bytes(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_a_missing_wheel_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name == "chitchat_dataset" else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(AssetError, match=r"pip install --no-deps chitchat-dataset==0\.9\.0"):
        build_datasets(tmp_path / "data", seed=0)
    assert not (tmp_path / "data").exists()


def test_a_bad_seed_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        build_datasets(tmp_path / "data", seed="0")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- reading, reporting


def test_read_jsonl_is_the_shared_reader_with_its_error_format(tmp_path: Path) -> None:
    assert read_jsonl is ensemble.jsonl.read_jsonl
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n{"b": 2}\n{"c": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:4: not valid JSON"):
        read_jsonl(path)


def test_the_readme_is_the_specification_with_the_constants_filled_in(
    built: tuple[Path, dict[str, Any]],
) -> None:
    out, summary = built
    text = (out / "README.md").read_text(encoding="utf-8")
    assert ":data:" not in text and "``" not in text
    flat = " ".join(text.split())
    assert f"capped at {datasets.CONFLICT_CAP} per topic" in flat
    assert f"at a word boundary to {sources.REPLY_MAX_CHARS} characters" in flat
    headings = [line for line in text.splitlines() if line.startswith("### ")]
    assert headings[0] == "### `sft_topics_{train,val,test}.jsonl`"
    assert len(headings) == 6
    for name, count in summary["files"].items():
        assert f"| `{name}` | {count} |" in text


def test_format_summary_lists_every_file_with_its_count(
    built: tuple[Path, dict[str, Any]],
) -> None:
    _, summary = built
    text = format_summary(summary)
    for name, count in summary["files"].items():
        line = next(line for line in text.splitlines() if line.startswith(name))
        assert line.split()[-1] == str(count)
    assert "conflicting" in text
