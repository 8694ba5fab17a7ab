"""The torch side: the α-Rényi ensemble trainer (transformers + peft + accelerate)."""
