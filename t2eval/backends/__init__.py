"""Generation backends (HF transformers, vLLM) behind one small interface (see base.py)."""
