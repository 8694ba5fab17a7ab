"""Bad input gets a one-line error before training (exit 2, nothing written); data masking."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from softspec.cli import main
from tests.training.conftest import chat, write_jsonl
from training.data import IGNORE, load_dpo, load_sft


def run(capsys, *args: str) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    code = main(["train", "sft", *args])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error" in line.lower() or "Traceback" in line]
    assert len(errors) <= 1, err  # one line, no traceback
    return code, errors[0] if errors else ""


@pytest.mark.parametrize(
    "rows,match",
    [
        ([{"prompt": "q"}], "missing field 'completion'"),
        ([{"question": "q", "answer": "a"}], "needs 'prompt' and 'completion', or 'messages'"),
        (
            [
                {
                    "prompt": [{"role": "robot", "content": "q"}],
                    "completion": [{"role": "assistant", "content": "a"}],
                }
            ],
            "role",
        ),
        ([{"prompt": "q", "completion": "  "}], "empty"),
        ([{"prompt": 3, "completion": "a"}], "list of messages"),
        ([], "empty"),
    ],
)
def test_bad_data_is_one_line_before_training(
    tiny_llama_dir: Path, tmp_path: Path, capsys, rows, match
) -> None:  # type: ignore[no-untyped-def]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    code, err = run(
        capsys, "--base", str(tiny_llama_dir), "--data", str(data), "--out", str(tmp_path / "o")
    )
    assert code == 2 and match in err, err
    assert "d.jsonl" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]  # nothing written


def test_not_json_names_the_line(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(chat("q", "a", "t")) + "\n{oops\n")
    code, err = run(
        capsys, "--base", str(tiny_llama_dir), "--data", str(data), "--out", str(tmp_path / "o")
    )
    assert code == 2 and "d.jsonl:2" in err


@pytest.mark.parametrize(
    "args,match",
    [
        (["--alpha", "-1"], "--alpha must be >= 0"),
        (["--members", "0"], "--members must be >= 1"),
        (["--target-modules", "q_proj,warp_drive"], "warp_drive not in the model"),
        (["--max-length", "4"], "no completion tokens left after truncation"),
    ],
)
def test_bad_options_are_one_line(
    tiny_llama_dir: Path, sft_data: Path, tmp_path: Path, capsys, args, match
) -> None:  # type: ignore[no-untyped-def]
    code, err = run(
        capsys,
        "--base",
        str(tiny_llama_dir),
        "--data",
        str(sft_data),
        "--out",
        str(tmp_path / "o"),
        *args,
    )
    assert code == 2 and match in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.run").exists()


def test_missing_base_and_occupied_out(
    sft_data: Path, tiny_llama_dir: Path, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    code, err = run(
        capsys,
        "--base",
        str(tmp_path / "nope"),
        "--data",
        str(sft_data),
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 2 and "not a model directory" in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    code, err = run(
        capsys,
        "--base",
        str(tiny_llama_dir),
        "--data",
        str(sft_data),
        "--out",
        str(tmp_path / "busy"),
    )
    assert code == 2 and "not an ensemble" in err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"


def test_completion_only_labels_for_each_format(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    eos = tok.eos_token_id
    conv = write_jsonl(tmp_path / "c.jsonl", [chat("hello", "yes no", "t")])
    ex = load_sft(conv, tok, 512)[0]
    learned = [t for t in ex.labels if t != IGNORE]
    assert tok.decode(learned) == "yes no<|im_end|>" and learned[-1] == eos
    assert ex.input_ids[-1] == eos  # the template's trailing newline is not learned
    assert ex.group == "t"
    plain = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello", "completion": " yes"}])
    ex = load_sft(plain, tok, 512)[0]
    assert [t for t in ex.labels if t != IGNORE] == [
        *tok(" yes", add_special_tokens=False)["input_ids"],
        eos,
    ]
    msgs = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": "four"},
    ]
    ex = load_sft(write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}]), tok, 512)[0]
    spans, cur = [], []
    for t in ex.labels:
        if t == IGNORE:
            if cur:
                spans.append(cur)
            cur = []
        else:
            cur.append(t)
    spans.append(cur)
    assert [tok.decode(s) for s in spans if s] == ["two<|im_end|>", "four<|im_end|>"]


def test_dpo_rows_are_validated(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from ensemble.errors import DataError

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    same = {"prompt": "q", "chosen": "a", "rejected": " a "}
    with pytest.raises(DataError, match="identical"):
        load_dpo(write_jsonl(tmp_path / "s.jsonl", [same]), tok, 64)
    with pytest.raises(DataError, match="missing 'rejected'"):
        load_dpo(write_jsonl(tmp_path / "m.jsonl", [{"prompt": "q", "chosen": "a"}]), tok, 64)
    with pytest.raises(DataError, match="empty"):
        load_dpo(
            write_jsonl(tmp_path / "e.jsonl", [{"prompt": "q", "chosen": "", "rejected": "b"}]),
            tok,
            64,
        )


@pytest.mark.parametrize("mode", ["coupled", "sequential"])
def test_accelerate_two_processes_match_one(
    tiny_llama_dir: Path, two_cluster_data: Path, tmp_path: Path, mode: str
) -> None:
    """`accelerate launch` data-parallel (2 CPU processes, gloo) = one process, same global batch.

    ``sequential`` runs the members' backward passes outside the DDP wrapper and averages
    the gradients itself; it must match the one-process coupled run too.

    On CPU, accelerate's MULTI_CPU mode needs mpirun; `--multi_gpu` starts torch.distributed
    workers and the Trainer picks gloo for CPU tensors. Tolerance 1e-5 (float32 reduction order).
    """
    common = [
        *("--base", str(tiny_llama_dir), "--data", str(two_cluster_data)),
        *("--members", "2", "--alpha", "1", "--max-steps", "4"),
        *("--lora-dropout", "0", "--learning-rate", "1e-2"),
    ]
    launcher = [
        *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"),
        *("--num_processes", "2", "--main_process_port", "29533"),
        *("-m", "softspec.cli", "train", "sft"),
    ]
    dist = subprocess.run(
        [
            *launcher,
            *common,
            "--out",
            str(tmp_path / "dp"),
            "--batch-size",
            "2",
            "--member-memory",
            mode,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert dist.returncode == 0, dist.stderr[-3000:]
    assert main(["train", "sft", *common, "--out", str(tmp_path / "sp"), "--batch-size", "4",
                 "--member-memory", "coupled"]) == 0  # fmt: skip
    for m in ("m0", "m1"):
        a = load_file(tmp_path / "dp" / "adapters" / m / "adapter_model.safetensors")
        b = load_file(tmp_path / "sp" / "adapters" / m / "adapter_model.safetensors")
        assert set(a) == set(b)
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5), (m, k)
        assert max(v.abs().max() for v in a.values()) > 1e-3  # it did train


def test_help_lists_the_options(capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exc:
        main(["train", "sft", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--members",
        "--alpha",
        "--max-steps",
        "--resume",
        "--weights",
        "--normalize-by-length",
    ):
        assert flag in out or flag.replace("-", "_") in out


BAD_MAPPED = {  # one bad value for every config field passed into TrainingArguments
    "batch_size": ("0", "--batch-size"),
    "grad_accum": ("0", "--grad-accum"),
    "learning_rate": ("nan", "--learning-rate"),
    "lr_scheduler": ("cosine_typo", "--lr-scheduler"),
    "warmup_ratio": ("2", "--warmup-ratio"),
    "max_steps": ("0", "--max-steps"),
    "epochs": ("inf", "--epochs"),
    "max_grad_norm": ("-1", "--max-grad-norm"),
    "seed": ("-3", "--seed"),
    "logging_steps": ("0", "--logging-steps"),
    "save_steps": ("0", "--save-steps"),
    "eval_steps": ("-1", "--eval-steps"),
}


def test_every_field_mapped_to_training_arguments_is_validated(
    tiny_llama_dir: Path, sft_data: Path, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    from training.run import MAPPED_FIELDS

    assert set(MAPPED_FIELDS.values()) == set(BAD_MAPPED)  # a new mapped field needs a check
    for field, (value, flag) in BAD_MAPPED.items():
        code, err = run(capsys, "--base", str(tiny_llama_dir), "--data", str(sft_data),
                        "--out", str(tmp_path / "o"), "--" + field.replace("_", "-"), value)  # fmt: skip
        assert code == 2 and err.startswith("softspec") and flag in err, (field, err)
        assert not (tmp_path / "o.run").exists()


def test_the_training_library_does_not_import_the_application() -> None:
    """Wiring lives in softspec/ (train_cmd): training/ gets the default base and the
    diagnosis as parameters and never imports softspec, not even inside a function."""
    import ast

    import training

    found = []
    for path in sorted(Path(training.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "softspec"]
    assert found == []


def test_the_library_needs_a_base_when_the_application_gives_no_default(
    sft_data: Path, tmp_path: Path
) -> None:
    from ensemble.errors import ConfigError
    from training.cli import run_train

    with pytest.raises(ConfigError, match="--base is required"):
        run_train("sft", ["--data", str(sft_data), "--out", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="--alpha auto needs the stability diagnosis"):
        run_train("sft", ["--data", str(sft_data), "--out", str(tmp_path / "o"), "--base", "b",
                          "--alpha", "auto"])  # fmt: skip


def test_read_rows_errors_name_the_file_and_line(tmp_path: Path) -> None:
    from ensemble.errors import DataError
    from training.data import read_rows

    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n[1, 2]\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: each line must be a JSON object"):
        read_rows(path)
    path.write_bytes(b'{"a": "\xff"}\n')  # not UTF-8: one clear line, not a traceback
    with pytest.raises(DataError, match=r"d.jsonl: cannot read it"):
        read_rows(path)
    path.write_text("\n\n")
    with pytest.raises(DataError, match="the file is empty"):
        read_rows(path)
    path.write_text('{"a": 1}\n\n{"b": 2}\n')
    assert read_rows(path) == [{"a": 1, "_line": 1}, {"b": 2, "_line": 3}]
