"""The ensemble manifest: round trip, hash verification and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ensemble import manifest as mf
from ensemble.atomic import atomic_dir, sha256_file
from ensemble.errors import ManifestError
from ensemble.scores import DEFAULT_GATE_SCORE, DEFAULT_GATE_THRESHOLD


def make_ensemble(
    root: Path, k: int = 3, weights: list[float] | None = None
) -> mf.EnsembleManifest:
    members = []
    for i in range(k):
        adir = root / "adapters" / f"m{i}"
        adir.mkdir(parents=True)
        (adir / mf.ADAPTER_FILE).write_bytes(f"weights-{i}".encode())
        (adir / "adapter_config.json").write_text("{}")
        members.append(
            mf.MemberSpec(
                name=f"m{i}",
                adapter=f"adapters/m{i}",
                weight=(weights or [1 / k] * k)[i],
                sha256=sha256_file(adir / mf.ADAPTER_FILE),
            )
        )
    m = mf.EnsembleManifest(
        name="demo",
        base_model="base",
        objective="sft",
        alpha=0.8,
        members=members,
        lora=mf.LoraSpec(r=8, alpha=16, target_modules=["q_proj", "v_proj"]),
        training={"routing": {"mean_responsibility": [1 / k] * k}},
    )
    m.save(root)
    return m


def test_round_trip_and_derived_values(tmp_path: Path) -> None:
    m = make_ensemble(tmp_path, weights=[0.5, 0.25, 0.25])
    loaded = mf.load(tmp_path)
    assert loaded == m
    raw = json.loads((tmp_path / "ensemble.json").read_text())
    assert raw["format"] == "softspec.ensemble/v1"
    assert set(raw) == {
        "format", "name", "base_model", "objective", "alpha", "members", "lora", "training", "gate"
    }  # fmt: skip
    assert set(raw["members"][0]) == {"name", "adapter", "weight", "sha256"}
    assert raw["gate"] == {"score_name": DEFAULT_GATE_SCORE, "threshold": DEFAULT_GATE_THRESHOLD}
    assert np.exp(loaded.log_weights()) == pytest.approx([0.5, 0.25, 0.25])
    assert loaded.served_name("m1").startswith("demo-") and loaded.served_name("m1").endswith("-m1")
    assert loaded.adapter_dir(tmp_path, "m2") == tmp_path / "adapters" / "m2"


def test_version_changes_with_any_adapter(tmp_path: Path) -> None:
    m = make_ensemble(tmp_path)
    other = m.model_copy(update={"members": [m.members[0].model_copy(update={"sha256": "0" * 64})]})
    assert other.version != m.version
    assert m.model_copy(update={"alpha": 0.1}).version != m.version


def test_hash_mismatch_names_the_member(tmp_path: Path) -> None:
    make_ensemble(tmp_path)
    (tmp_path / "adapters" / "m1" / mf.ADAPTER_FILE).write_bytes(b"tampered")
    with pytest.raises(ManifestError, match="member m1.*sha256"):
        mf.load(tmp_path)
    mf.load(tmp_path, verify=False)  # explicit opt-out still reads it


def test_missing_adapter_names_the_member(tmp_path: Path) -> None:
    make_ensemble(tmp_path)
    (tmp_path / "adapters" / "m2" / "adapter_config.json").unlink()
    with pytest.raises(ManifestError, match="member m2.*missing"):
        mf.load(tmp_path)


@pytest.mark.parametrize(
    "patch,match",
    [
        ({"format": "other/v9"}, "unsupported format"),
        ({"alpha": -1}, "alpha"),
        ({"objective": "ppo"}, "objective"),
        ({"members": []}, "members"),
        ({"gate": {"score_name": "vibes", "threshold": 1}}, "gate"),
        ({"extra_field": 1}, "extra_field"),
    ],
)
def test_invalid_manifest_is_a_clear_error(tmp_path: Path, patch: dict, match: str) -> None:
    make_ensemble(tmp_path)
    raw = json.loads((tmp_path / "ensemble.json").read_text())
    raw.update(patch)
    (tmp_path / "ensemble.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=match):
        mf.load(tmp_path)


def test_weights_must_sum_to_one_and_names_unique(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        make_ensemble(tmp_path / "a", weights=[0.5, 0.5, 0.5])
    m = make_ensemble(tmp_path / "b")
    dup = [m.members[0], m.members[0].model_copy(update={"weight": m.members[1].weight * 2})]
    with pytest.raises(ValueError, match="unique"):
        mf.EnsembleManifest.model_validate({**m.model_dump(), "members": dup})


def test_not_an_ensemble_dir_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        mf.load(tmp_path)
    (tmp_path / "ensemble.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        mf.load(tmp_path)


def test_adapter_paths_must_stay_inside(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="relative"):
        mf.MemberSpec(name="m0", adapter="../elsewhere", weight=1.0, sha256="0" * 64)


def test_base_model_resolution(tmp_path: Path) -> None:
    m = make_ensemble(tmp_path)
    assert m.resolve_base_model(tmp_path) == "base"  # not a path here: a hub id
    (tmp_path / "base").mkdir()
    assert m.resolve_base_model(tmp_path) == str((tmp_path / "base").resolve())


def test_atomic_dir_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "ens"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("crash")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "done").write_text("x")
    assert (target / "done").read_text() == "x"
    with pytest.raises(FileExistsError), atomic_dir(target):
        pass
    with atomic_dir(target, replace=True) as tmp:
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["ens"]


def _with_reference(root: Path) -> mf.EnsembleManifest:
    from ensemble.density import REFERENCE_FILE, fit_gaussian, reference_bytes

    m = make_ensemble(root)
    ref = fit_gaussian(np.random.default_rng(0).normal(size=(12, 3)), 0.1)
    (root / REFERENCE_FILE).write_bytes(reference_bytes(ref))
    spec = mf.DensitySpec(sha256=sha256_file(root / REFERENCE_FILE), shrinkage=0.1, n=12, dim=3)
    m = m.model_copy(update={"density": spec})
    m.save(root)
    return m


def test_density_reference_round_trip_and_verification(tmp_path: Path) -> None:
    m = _with_reference(tmp_path)
    assert mf.load(tmp_path) == m
    raw = json.loads((tmp_path / "ensemble.json").read_text())
    assert raw["density"]["layer"] == "last" and raw["density"]["pooling"] == "user"
    (tmp_path / "reference.npz").write_bytes(b"changed")
    with pytest.raises(ManifestError, match="density: .*reference.npz has sha256"):
        mf.load(tmp_path)
    mf.load(tmp_path, verify=False)  # the hash is what verification checks
    (tmp_path / "reference.npz").unlink()
    with pytest.raises(ManifestError, match="reference.npz is missing"):
        mf.load(tmp_path)


def test_density_file_must_stay_inside(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="inside the ensemble directory"):
        mf.DensitySpec(file="../ref.npz", sha256="0" * 64, shrinkage=0.1, n=2, dim=1)
