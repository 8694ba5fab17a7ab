"""The prompt sets and disagreement measures of ``bench/conflict_disagreement.py``."""

from __future__ import annotations

import itertools

import pytest

from bench.conflict_disagreement import (
    compare,
    convention,
    convention_disagreement,
    pair_disagreement,
    prompt_sets,
)


def _row(*turns: str) -> dict:
    prompt = []
    for i, t in enumerate(turns):
        prompt.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": "x"}]}


def test_prompt_sets_follow_what_the_training_data_says_about_each_prompt() -> None:
    topics_train = [
        _row("What is AI?"),  # also conflicting: not ordinary
        _row("Hi", "Hello", "How are you?"),  # ordinary, multi-turn
        _row("Hi", "Hello", "what is  ai?"),  # a user turn is a conflict prompt: not ordinary
        _row("Tell me a joke"),  # ordinary
        _row("Tell me a joke"),  # duplicate
    ]
    conflict_train = [_row("What is AI?"), _row("What is AI?"), _row("Are you a robot?")]
    conflict_test = [_row("Do you dream?"), _row("Sing a song"), _row("what is ai?")]
    topics_test = [
        _row("Do you dream?"),  # in the conflict test file: not ordinary
        _row("Tell me a joke"),  # trained
        _row("Who wrote Hamlet?"),  # ordinary, held out
    ]
    sets = prompt_sets(topics_train, topics_test, conflict_train, conflict_test, n=10)
    content = {k: [r["prompt"][-1]["content"] for r in v] for k, v in sets.items()}
    assert content == {
        "conflict_trained": ["What is AI?", "Are you a robot?"],
        "ordinary_trained": ["How are you?", "Tell me a joke"],
        "conflict_heldout": ["Do you dream?", "Sing a song"],
        "ordinary_heldout": ["Who wrote Hamlet?"],
    }
    assert [len(v) for v in prompt_sets(topics_train, [], conflict_train, [], n=1).values()] == [
        1,
        1,
        0,
        0,
    ]


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("PYTHON.", "upper"),
        ("YES I AM INSPIRED BY DATA'S PERSONALITY", "upper"),
        ("python", "lower"),
        ("yes i am 42", "lower"),
        ("Python is a language.", "mixed"),
        ("I AM a robot", "mixed"),
        ("42!", "none"),
        ("", "none"),
    ],
)
def test_convention(text: str, label: str) -> None:
    assert convention(text) == label


@pytest.mark.parametrize("labels", [["a"], ["a", "a"], ["a", "b"], ["a", "b", "a", "c"]])
def test_pair_disagreement_counts_pairs(labels: list[str]) -> None:
    pairs = list(itertools.combinations(labels, 2))
    expected = sum(x != y for x, y in pairs) / len(pairs) if pairs else 0.0
    assert pair_disagreement(labels) == pytest.approx(expected)
    assert pair_disagreement(["a", "b", "a", "c"]) == pytest.approx(5 / 6)


def test_convention_disagreement_leaves_out_answers_without_letters() -> None:
    assert convention_disagreement({"m0": "upper", "m1": "none", "m2": "mixed"}) == 1.0
    assert convention_disagreement({"m0": "upper", "m1": "upper", "m2": "lower"}) == 2 / 3
    assert convention_disagreement({"m0": "upper", "m1": "none"}) is None


def test_compare_against_the_exact_permutation_distribution() -> None:
    """[3, 4, 5] vs [0, 1, 2]: every conflict value is above every ordinary one, and only
    1 of the C(6, 3) = 20 splits has a mean difference as large (p = 0.05 exactly)."""
    c = compare([3.0, 4.0, 5.0], [0.0, 1.0, 2.0])
    assert c["difference"] == 3.0 and c["p_above"] == 1.0
    assert c["p_value"] == pytest.approx(1 / 20, abs=0.01)
    reverse = compare([0.0, 1.0, 2.0], [3.0, 4.0, 5.0])
    assert reverse["p_above"] == 0.0 and reverse["p_value"] == 1.0
    ties = compare([1.0, 1.0], [1.0, 1.0])
    assert ties["p_above"] == 0.5 and ties["p_value"] == 1.0
