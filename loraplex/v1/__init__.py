"""vLLM V1's import paths for what user code plugs into the engine (loraplex.v1.sample...)."""
