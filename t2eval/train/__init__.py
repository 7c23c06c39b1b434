"""Training: one loop (loop.py) with an SVF learner (reinforce.py) and a LoRA learner (lora.py); stage configs in configs.py."""
