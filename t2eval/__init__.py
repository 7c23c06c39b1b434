"""t2eval: reproducible benchmark harness for Transformer² (self-adaptive LLMs)."""

__version__ = "0.1.0"
