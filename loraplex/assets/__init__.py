"""vLLM's example assets (`vllm.assets`): public test media downloaded once into a cache
directory."""
