"""The batched LoRA op interface. The torch reference serves the CPU; a GPU backend
(Triton) plugs in here with the same signatures."""

from loraplex.lora.ops.torch_ops import add_lora, lora_expand, lora_shrink

__all__ = ["add_lora", "lora_expand", "lora_shrink"]
