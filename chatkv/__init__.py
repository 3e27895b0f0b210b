"""chatkv: local LLM chat whose KV cache survives turns and restarts."""

__version__ = "0.1.0"
