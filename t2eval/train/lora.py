"""The LoRA baseline (PROTOCOL §4): peft LoRA, the LoRA learner of the training loop.

Defaults: rank 16, α 32, dropout 0.05 on q_proj + v_proj (`targets="mlp+attn"` adds gate/up/down
for Table 4 row #7); loss = mean token NLL of the reference solution (+ EOS) given the chat prompt,
prompt tokens masked (labels −100); AdamW lr 5e-5, global batch 256 by gradient accumulation over
micro-batches, gradient-norm clip 1.0, 200 iterations; every k iterations greedy generation on
the validation split scored by the task; the best-validation adapter is kept (peft
`save_pretrained` files in the output dir), `checkpoints/latest.pt` allows resuming (see `loop`),
and `log.jsonl` has one row per iteration like the SVF trainer.

Vision-language models (issue 10): the adapter goes on the language model only (`target_modules`: a
regex under its decoder prefix, since the vision tower has q_proj/v_proj too); rollouts and the loss take
each sequence's image (`loop.vision_inputs`), so the NTP target is the task's reference answer given
(image, question).

`objective="pg"` (Table 4 row #5) trains the adapter with the SVF trainer's REINFORCE loss
(train/losses.py): greedy rollouts of the current adapter, rewards ±1 from the task scorer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from ..errors import T2EvalError
from . import losses, loop
from .configs import LORA_TARGETS, LoRATrainConfig

log = logging.getLogger(__name__)

__all__ = ["LORA_TARGETS", "LoRATrainConfig", "LoRALearner", "target_modules", "lora_model", "lm_labels", "trainable_state",
           "save_adapter", "load_adapter", "train_lora"]
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def target_modules(targets: str, language_prefix: str = ""):
    """peft `target_modules` of a targets name: the projection names (a text model: every module so named)
    or, with the `language_prefix` of a vision-language model's decoder, a regex that peft full-matches
    against module names, so no vision-tower projection (CLIP has q_proj/v_proj too) gets an adapter."""
    if targets not in LORA_TARGETS:
        raise T2EvalError(f"unknown LoRA targets {targets!r}: use {' or '.join(LORA_TARGETS)}")
    names = LORA_TARGETS[targets]
    if not language_prefix:
        return list(names)
    return rf"{re.escape(language_prefix)}\..*\.({'|'.join(map(re.escape, names))})"


def lora_model(model, rank: int = 16, alpha: int = 32, dropout: float = 0.05, targets: str = "attn",
               seed: int = 0, language_prefix: str = ""):
    """Wrap `model` with a fresh, seeded peft LoRA adapter (base weights frozen); `language_prefix`: see
    `target_modules`."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                     target_modules=target_modules(targets, language_prefix), bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, cfg)


def lm_labels(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int):
    """(input_ids, attention_mask, labels) of a left-padded batch: labels −100 on prompt and padding.

    The trainer's loss (`losses.sequence_loss_backward` with `ntp_weights`) equals transformers'
    causal-LM loss with these labels (tested); this is the explicit form of that masking.
    """
    from ..backends.hf import left_pad

    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    ids, mask, _ = left_pad(seqs, pad_id)
    labels = torch.full_like(ids, -100)
    for i, c in enumerate(completion_ids):
        if len(c):
            labels[i, ids.shape[1] - len(c):] = torch.as_tensor(list(c))
    return ids, mask, labels


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model, out: Path) -> None:
    """peft `save_pretrained` into `out`, file by file atomically (tmp dir + rename)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter.", dir=out))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        for f in sorted(tmp.iterdir()):
            if f.is_file():
                os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_adapter(model_dir: str, adapter_dir: str, dtype: str = "float32", device: str = "cpu"):
    """The base model with a saved adapter (for evaluation)."""
    from peft import PeftModel

    from ..models.loading import load_model

    if not (Path(adapter_dir) / "adapter_config.json").exists():
        raise T2EvalError(f"{adapter_dir} holds no LoRA adapter (adapter_config.json): train it with `t2eval train-lora`")
    return PeftModel.from_pretrained(load_model(model_dir, dtype=dtype, device=device), adapter_dir).eval()


class LoRALearner:
    """The trainable adapter weights of a seeded peft LoRA model for `loop.train`."""

    stage, state_key, what, optimizer = "train-lora", "adapter", "the adapter weights", "adamw"

    def __init__(self, cfg: LoRATrainConfig):
        from ..models.loading import load_model, load_tokenizer, resolve_model_dir
        from ..svd import model_layout

        self.cfg = cfg
        base = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
        self.processor, self.image_encoder = loop.vision_inputs(cfg, base)
        self.tokenizer = self.processor.tokenizer if self.processor is not None else load_tokenizer(cfg.model)
        prefix = model_layout(resolve_model_dir(cfg.model))["language_prefix"] if self.processor is not None else ""
        self.model = lora_model(base, cfg.rank, cfg.alpha, cfg.dropout, cfg.targets, cfg.seed, language_prefix=prefix)
        self._params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def params(self) -> list[torch.Tensor]:
        return list(self._params.values())

    def state(self) -> dict[str, torch.Tensor]:
        return trainable_state(self.model)

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self._params.items():
                p.copy_(state[n])

    def make_backend(self, cfg: LoRATrainConfig):
        return loop.build_backend("hf", self.model, self.tokenizer, cfg, processor=self.processor)

    @contextlib.contextmanager
    def generating(self, backend):
        """The backend shares the peft model: generate in eval mode (no dropout)."""
        self.model.eval()
        yield

    def loss_backward(self, p_ids, c_ids, weights, extra_inputs=None) -> dict[str, float]:
        self.model.train()  # LoRA dropout
        try:
            return losses.sequence_loss_backward(self.model, p_ids, c_ids, weights, pad_id=self.tokenizer.pad_token_id,
                                                 micro_batch=self.cfg.micro_batch, device=self.cfg.device,
                                                 extra_inputs=extra_inputs)
        finally:
            self.model.eval()

    def log_stats(self) -> dict[str, float]:
        return {}

    def write_outputs(self, out: Path, state: dict[str, torch.Tensor], best: dict) -> None:
        """The peft adapter files of the best state (swapped in for the save, the current one restored)."""
        current = self.state()
        self.load_state(state)
        try:
            save_adapter(self.model, out)
        finally:
            self.load_state(current)

    def summary_paths(self, out: Path) -> dict:
        return {"adapter": str(out), "trainable_params": int(sum(p.numel() for p in self.params()))}

    def inputs(self) -> dict:
        return {"model": str(self.cfg.model)}

    def provenance(self) -> dict:
        return {}


def train_lora(cfg: LoRATrainConfig, task=None) -> dict:
    """Train (or resume) a LoRA adapter; returns a summary dict."""
    return loop.run_training(cfg, LoRALearner, task)
