"""Test-time adaptation: first-pass dispatch (prompt / cls / logprob) and few-shot α search (CEM)."""
