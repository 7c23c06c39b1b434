"""Training: batched rollouts, SVF REINFORCE (reinforce.py), the LoRA baseline (lora.py)."""
