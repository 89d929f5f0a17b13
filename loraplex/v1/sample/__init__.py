"""vLLM's `vllm.v1.sample` path: only its logits_processor package exists here."""
