"""The VQA tasks of the vision-language experiment (issue 10): textvqa, okvqa, synth_textvqa.

Prompt (user turn; no system message): the image placeholder, the question, the OCR tokens when
``ocr_in_prompt`` is on, and the short-answer instruction::

    <image>
    What does the sign say?
    OCR tokens: SALE, STOP, Fresh
    Answer the question using a single word or phrase.

The ``<image>`` placeholder opens the user turn (LLaVA's layout: Llama3-LLaVA-NeXT's processor
template renders images first, then the text); the processor expands it into the image's feature
tokens, so ``task.prompt(tokenizer, doc)`` is exactly the text the model's processor takes together
with ``task.image(doc)``. OCR tokens in the prompt (paper text, no code: an option): on by default for
synth_textvqa and for the embedded model (its vision tower is random, `models.llava.NOTE_RANDOM_VISION`;
`evaluate` turns it on), off for textvqa/okvqa otherwise (OK-VQA has no OCR tokens).

Score: `vqa.vqa_accuracy` (``normalise`` evalai | official) of the completion's first line;
``score_batch`` (the bool interface every task has) = accuracy > 0; ``accuracy_batch`` the accuracies
(the metric: RL validation scores and result cells); ``reward`` = `vqa.reward` (``reward`` binary: +1 / −0.1,
or soft).
"""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import T2EvalError
from . import vqa
from .base import Task, check_option
from .registry import register_task

IMAGE_TOKEN = "<image>"  # = models.llava.IMAGE_TOKEN and LLaVA-NeXT's (lm-eval's DEFAULT_IMAGE_PLACEHOLDER too)
SHORT_ANSWER = "Answer the question using a single word or phrase."
OCR_PREFIX = "OCR tokens: "
MAX_NEW_TOKENS = 16
STOP = ("\n",)


class VQATask(Task):
    """Shared by the three VQA tasks; subclasses set `ocr_default`."""

    ocr_default: bool = False
    max_new_tokens = MAX_NEW_TOKENS
    modality = "image"  # the training loop's image-task interface (`train.rollout.ImageTask`)

    def __init__(self, ocr_in_prompt: bool | str | None = None, normalise: str = "evalai",
                 reward: str = "binary") -> None:
        self.ocr_in_prompt = self.ocr_default if ocr_in_prompt in (None, "") else _bool(ocr_in_prompt)
        self.normalise = check_option(self.key, "normalise", normalise, vqa.NORMALISERS)
        self.reward_mode = check_option(self.key, "reward", reward, vqa.REWARDS)
        self.options = {"ocr_in_prompt": self.ocr_in_prompt, "normalise": normalise, "reward": reward}

    # ------------------------------------------------------------------ data
    def docs(self, split: str, data_dir=None) -> list[dict]:
        """The VQA rows of `split` (`data.splits.task_split`: doc_id = question_id, `image_path`)."""
        from ..data.splits import task_split

        return list(task_split(self.key, split, data_dir))

    def image(self, doc: dict):
        """The doc's image (RGB PIL), its content checked against its name (`vqa_data.load_image`)."""
        from ..data.vqa_data import load_image

        if not doc.get("image_path"):
            raise T2EvalError(f"{self.key} doc {doc.get('doc_id')!r} has no image_path: read docs with "
                              "task.docs(split, data_dir)")
        return load_image(doc["image_path"])

    # --------------------------------------------------------------- prompts
    @property
    def gen_kwargs(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "stop": list(STOP)}

    def user_message(self, doc: dict) -> str:
        parts = [IMAGE_TOKEN, doc["question"]]
        if self.ocr_in_prompt and doc.get("ocr_tokens"):
            parts.append(OCR_PREFIX + ", ".join(doc["ocr_tokens"]))
        parts.append(SHORT_ANSWER)
        return "\n".join(parts)

    def reference(self, doc: dict) -> str:
        """The most common annotator answer (ties: the first seen), the NTP target."""
        answers = list(doc["answers"])
        return max(answers, key=lambda a: (answers.count(a), -answers.index(a)))

    # --------------------------------------------------------------- scoring
    def postprocess(self, doc: dict, completion: str) -> str:
        lines = [ln for ln in completion.strip().splitlines() if ln.strip()]
        return lines[0].strip() if lines else ""

    def accuracy(self, doc: dict, completion: str) -> float:
        return vqa.vqa_accuracy(self.postprocess(doc, completion), doc["answers"], self.normalise)

    def accuracy_batch(self, docs: Sequence[dict], completions: Sequence[str]) -> list[float]:
        if len(docs) != len(completions):
            raise ValueError(f"{len(docs)} docs but {len(completions)} completions")
        return [self.accuracy(d, c) for d, c in zip(docs, completions)]

    def score_one(self, doc: dict, completion: str) -> bool:
        return self.accuracy(doc, completion) > 0

    def reward(self, doc: dict, completion: str) -> float:
        """The RL reward (`vqa.reward`): binary +1 if the accuracy is > 0 else −0.1, or soft = the accuracy."""
        return vqa.reward(self.postprocess(doc, completion), doc["answers"], self.reward_mode, self.normalise)


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise T2EvalError(f"ocr_in_prompt={v!r}: use true or false")


@register_task("textvqa")
class TextVQA(VQATask):
    ocr_default = False


@register_task("okvqa")
class OKVQA(VQATask):
    ocr_default = False


@register_task("synth_textvqa")
class SynthTextVQA(VQATask):
    ocr_default = True
