"""CommitLLM: verifiable LLM inference (engine, kernels, verifier, keys)."""

__version__ = "0.1.0"
