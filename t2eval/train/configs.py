"""The training stages' options, one dataclass each (defaults + help + CLI in one place).

`train-svf` (`SVFTrainConfig`), `train-lora` (`LoRATrainConfig`) and `select-expert`
(`SelectConfig`) build their argparse options from these with `t2eval.stage_config`, and the
workflow renders their command lines with `stage_config.argv(values, Cls)`. This module imports
no torch, so the Snakefile can read it cheaply.

A training config's `identity()` is what a resumed run must share with the run that wrote the
checkpoint: every field except the ones in `RESUME_FREE` (where the outputs go, how the work is
batched or shown, which device): those may change between an interruption and its resumption.
The protocol (`--protocol`, t2eval.protocol) and its training knobs (`--bos`, `--pg-code-prompt`,
`--cls-max-new-tokens`; None = the protocol's value) are part of it: `loop.apply_protocol` makes them
concrete before the checkpoint is compared, so a run started under `release` never resumes under
`corrected` (or under another $T2EVAL_PROTOCOL).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from ..constants import CLS_TASKS, TRAIN_TASKS, VLM_TRAIN_TASKS
from ..stage_config import opt

TASKS: tuple[str, ...] = TRAIN_TASKS + CLS_TASKS + VLM_TRAIN_TASKS  # VQA tasks: on a vision-language model
DTYPES = ("float32", "bfloat16", "float16")
OBJECTIVES = ("pg", "ntp")
PROTOCOLS = ("release", "corrected")  # = t2eval.protocol.PROTOCOLS (tested)
BOS_MODES = ("double", "single")      # = t2eval.tokens.BOS_MODES (tested)
PG_CODE_PROMPTS = ("prefill_turn", "sampling_prompt")  # = losses.PG_CODE_PROMPTS (tested)
SVF_PRECISIONS = ("fp32", "bf16")     # = t2eval.svf.PRECISIONS (tested); this module imports no torch
# TrainConfig fields that override a protocol knob of the same name (None: the protocol's value)
KNOB_FIELDS: tuple[str, ...] = ("bos", "pg_code_prompt", "cls_max_new_tokens")
# LoRA target modules: attn = the paper's q_proj + v_proj; mlp+attn adds the MLP (Table 4 row #7)
LORA_TARGETS: dict[str, list[str]] = {"attn": ["q_proj", "v_proj"],
                                      "mlp+attn": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]}


@dataclass
class TrainConfig:
    """Options shared by both trainers (the loop in `t2eval.train.loop`)."""

    RESUME_FREE: ClassVar[tuple[str, ...]] = ("out", "backend", "micro_batch", "eval_limit", "eval_splits",
                                              "stop_after", "device", "data_dir", "progress", "threads")

    model: str = opt(required=True, help="HF model directory (or registry key prepared under models/)")
    task: str = opt(required=True, help="training task", choices=TASKS)
    out: str = opt(required=True, help="output dir, e.g. experts/<model>/<variant>/<task>; rerun the same "
                                       "command to resume (its outputs are rewritten from the checkpoint)")
    iterations: int = opt(200, help="optimiser steps")
    batch_size: int = opt(256, help="global batch (clipped to the train-split size; gradient accumulation)")
    micro_batch: int = opt(8, help="sequences per padded forward/backward")
    max_new_tokens: int | None = opt(None, help="rollout/eval length (default: the task's, 512); the classifier "
                                                "tasks (cls, cls_leakfree) use --cls-max-new-tokens instead")
    eval_every: int = opt(10, help="evaluate the --eval-splits every k iterations (and at the last)")
    eval_limit: int | None = opt(None, help="evaluate only the first n docs of each split")
    temperature: float = opt(0.0, help="rollout temperature (0: greedy, the release)")
    seed: int = opt(42, help="seed of the batch sampler, the initialisation and torch")
    data_dir: str = opt("data", help="canonical data (t2eval prepare-data)")
    dtype: str = opt("float32", help="model dtype", choices=DTYPES)
    device: str = opt("cpu", help="torch device")
    task_options: dict = opt(help="task constructor options", cli=False, default_factory=dict)
    stop_after: int | None = opt(None, help="stop this invocation after n iterations (the next run resumes)")
    threads: int = opt(0, help="torch CPU threads (0: torch's default; 1 is much faster on a shared, loaded machine)")
    progress: bool = opt(True, help="no tqdm progress bar")
    protocol: str | None = opt(None, help="release (the code release, bugs included) | corrected; default: "
                                          "$T2EVAL_PROTOCOL, else release. The task reward and the knobs below "
                                          "follow it (`t2eval protocol` lists every knob)", choices=PROTOCOLS)
    bos: str | None = opt(None, help="BOS of the loss's prompt tokens: double (release: the tokenizer's BOS even "
                                     "where the chat template has one) | single; default: the protocol's",
                          choices=BOS_MODES)
    pg_code_prompt: str | None = opt(None, help="prompt of the PG loss on code tasks: prefill_turn (release: "
                                                "\"@@ Response:\\n```python\", the pre-fill as an assistant turn) | "
                                                "sampling_prompt (the rollout's own prompt); default: the protocol's",
                                     choices=PG_CODE_PROMPTS)
    cls_max_new_tokens: int | None = opt(None, help="rollout/eval length on the classifier tasks (release: 1024, "
                                                    "whatever --max-new-tokens says); default: the protocol's")
    protocol_overrides: dict = opt(help="knob overrides in force ($T2EVAL_PROTOCOL_OVERRIDES + the knob options; "
                                        "set by loop.apply_protocol)", cli=False, default_factory=dict)

    def identity(self) -> dict:
        d = dataclasses.asdict(self)
        d["eval_splits"] = list(d["eval_splits"])
        return {k: v for k, v in d.items() if k not in self.RESUME_FREE}


@dataclass
class SVFTrainConfig(TrainConfig):
    """`t2eval train-svf`: one SVF expert vector z (PROTOCOL §3)."""

    svd: str = opt(required=True, help="SVD cache of the model (t2eval decompose)")
    eval_splits: tuple[str, ...] = opt(("train", "valid", "test"), help="comma-separated splits to evaluate "
                                                                        "(valid selects the best z)")
    objective: str = opt("pg", help="pg: REINFORCE; ntp: next-token prediction on the reference solutions "
                                    "(Table 4 #4)", choices=OBJECTIVES)
    kl_coef: float = opt(0.0, help="λ of the KL penalty against the base model")
    kl_direction: str = opt("code", help="code: KL(π_W‖π_W′) as the release computes it; paper: KL(π_W′‖π_W)",
                            choices=("code", "paper"))
    optimizer: str = opt("adam", help="adam (code release) or adamw with cosine decay (paper)",
                         choices=("adam", "adamw-cosine"))
    lr: float = opt(2e-3, help="learning rate")
    weight_decay: float = opt(0.0, help="AdamW weight decay")
    grad_clip: float = opt(1e-3, help="gradient-norm clip")
    param: str = opt("code", help="SVF parameterisation (code: sigmoid + mass rescale; paper: σ ⊙ z)",
                     choices=("code", "paper"))
    backend: str = opt("hf", help="rollout/evaluation backend", choices=("hf", "vllm"))
    svf_precision: str = opt("fp32", help="fp32 | bf16 (the release: z and Adam state bf16, W′ composed in bf16 "
                                          "from bf16 factors, also for the rollouts)", choices=SVF_PRECISIONS)


@dataclass
class LoRATrainConfig(TrainConfig):
    """`t2eval train-lora`: the LoRA baseline (PROTOCOL §4)."""

    eval_splits: tuple[str, ...] = opt(("valid",), help="comma-separated splits to evaluate (valid selects)")
    objective: str = opt("ntp", help="ntp: next-token prediction on the reference solutions; pg: REINFORCE "
                                     "(Table 4 #5)", choices=("ntp", "pg"))
    lr: float = opt(5e-5, help="AdamW learning rate")
    weight_decay: float = opt(0.0, help="AdamW weight decay")
    grad_clip: float = opt(1.0, help="gradient-norm clip (1.0; the paper also names 1e-3)")
    rank: int = opt(16, help="LoRA rank")
    alpha: int = opt(32, help="LoRA alpha")
    dropout: float = opt(0.05, help="LoRA dropout")
    targets: str = opt("attn", help="attn: q_proj+v_proj (default); mlp+attn: + gate/up/down_proj (Table 4 #7)",
                       choices=tuple(LORA_TARGETS))


@dataclass
class SelectConfig:
    """`t2eval select-expert`: keep the best of several train-svf runs by validation score."""

    candidates: tuple[str, ...] = opt(required=True, nargs="+", help="train-svf output directories")
    out: str = opt(required=True, help="directory receiving the selected expert's files")
