"""Builders shared by the tests: a tiny random Llama with a real (tiny) BPE tokenizer."""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "hello how are you today I am fine thank you",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "the quick brown fox jumps over the lazy dog",
    "yes no maybe always never red green blue one two three four five",
    "Tell me a joke. Why did the chicken cross the road? To get to the other side!",
    "0 1 2 3 4 5 6 7 8 9 , . ! ? ' \" : ; - ( )",
]


def make_tiny_tokenizer(out: Path):  # type: ignore[no-untyped-def]
    """A byte-level BPE (vocab ~400) with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return fast


def make_tiny_llama(out: Path, seed: int = 0) -> Path:
    """Save a tiny random LlamaForCausalLM (2 layers, hidden 32) with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tiny_tokenizer(out)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    return out


def clone_with_same_adapter(src: Path, dst: Path, name: str) -> Path:
    """Copy an ensemble directory with every member replaced by member 0's adapter."""
    import json
    import shutil

    from ensemble.atomic import sha256_file

    shutil.copytree(src, dst)
    raw = json.loads((dst / "ensemble.json").read_text())
    raw["name"] = name
    for m in raw["members"][1:]:
        shutil.rmtree(dst / m["adapter"])
        shutil.copytree(dst / raw["members"][0]["adapter"], dst / m["adapter"])
        m["sha256"] = sha256_file(dst / m["adapter"] / "adapter_model.safetensors")
    (dst / "ensemble.json").write_text(json.dumps(raw, indent=2))
    return dst


def randomize_lora_b(ens, seed: int = 0, scale: float = 0.3) -> None:  # type: ignore[no-untyped-def]
    """Non-zero LoRA B matrices (N(0, scale²), seeded) so the members really differ."""
    import torch

    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for n, p in ens.peft.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
