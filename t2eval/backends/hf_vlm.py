"""Images in the token batches of a vision-language model (LLaVA-NeXT, issue 10): generation and loss inputs.

A prompt of a vision-language task holds exactly one image token (the processor's ``image_token``,
e.g. ``<image>``). The model's forward replaces the image tokens of a row, in order, by that row's
image features, so the token ids must hold as many image tokens as the image has features: the
processor decides that number from the image size (LLaVA-NeXT's any-resolution grid), and
`ImageEncoder.encode` expands the single token into it. The text around it is tokenised exactly as
for a text model (`tokens.prompt_ids`, the BOS rule), so generation and the loss score the same ids.

Per sequence an `ImageInput` keeps its pixel values ``[patches, C, H, W]`` and image size; a batch
of any rows, in any order, gets its forward arguments from `image_batch` (patches zero-padded to
the batch's largest count: the model keeps only the first ``n(image_size)`` of each row, so the
padding is never seen). `ImageSequences(idx)` is that function for the rows ``idx`` of a list of
sequences — what the trainers' micro-batcher (`train.losses.sequence_loss_backward`, which sorts
sequences by length) calls so every row gets its own image.

`HFVLMBackend`: the HF backend (`hf.HFBackend`: left padding, micro-batches, stop strings) for
``generate(prompts, ..., images=[...])``, one image per prompt (without images: text-only prompts).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import T2EvalError
from .hf import HFBackend


def open_image(image: Any):
    """An RGB PIL image from a PIL image, a path or PNG/JPEG bytes."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image)).convert("RGB")
    if isinstance(image, (str, Path)):
        p = Path(image)
        if not p.is_file():
            raise T2EvalError(f"image {p} not found")
        with Image.open(p) as im:
            return im.convert("RGB")
    raise T2EvalError(f"an image must be a PIL image, a path or bytes, not {type(image).__name__}")


@dataclass(frozen=True)
class ImageInput:
    """One sequence's image as the model takes it."""

    pixel_values: torch.Tensor    # [patches, C, H, W], float32
    image_size: tuple[int, int]   # (height, width) of the original image
    n_tokens: int                 # image tokens its features fill


def image_batch(inputs: Sequence[ImageInput], dtype: torch.dtype | None = None,
                device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Forward arguments (pixel_values [B, P_max, C, H, W], image_sizes [B, 2]) of rows `inputs`, in that order."""
    p_max = max(x.pixel_values.shape[0] for x in inputs)
    pv = torch.zeros((len(inputs), p_max, *inputs[0].pixel_values.shape[1:]), dtype=inputs[0].pixel_values.dtype)
    for i, x in enumerate(inputs):
        pv[i, : x.pixel_values.shape[0]] = x.pixel_values
    sizes = torch.tensor([list(x.image_size) for x in inputs], dtype=torch.long)
    return {"pixel_values": pv.to(device=device, dtype=dtype), "image_sizes": sizes.to(device)}


class ImageSequences:
    """The image inputs of a list of sequences; ``self(idx)`` = the forward arguments of rows ``idx``."""

    def __init__(self, inputs: Sequence[ImageInput], dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None):
        self.inputs, self.dtype, self.device = list(inputs), dtype, device

    def __len__(self) -> int:
        return len(self.inputs)

    def __call__(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        return image_batch([self.inputs[i] for i in idx], self.dtype, self.device)


def expand_image_tokens(ids: Sequence[int], token_id: int, n: int) -> list[int]:
    """`ids` with its one image token repeated `n` times."""
    at = [k for k, t in enumerate(ids) if t == token_id]
    if len(at) != 1:
        raise T2EvalError(f"a vision-language prompt needs exactly one image token (id {token_id}), this one has "
                          f"{len(at)}: the task's prompt must place the processor's image token once")
    k = at[0]
    return list(ids[:k]) + [token_id] * n + list(ids[k + 1:])


class ImageEncoder:
    """Token ids + image inputs of (prompt, image) pairs for one model's processor."""

    def __init__(self, processor, dtype: torch.dtype | None = None, device: str | torch.device | None = None):
        self.processor, self.dtype, self.device = processor, dtype, device
        self.tokenizer = processor.tokenizer
        self.token = processor.image_token
        self.token_id = self.tokenizer.convert_tokens_to_ids(self.token)

    def image_input(self, image) -> ImageInput:
        if isinstance(image, ImageInput):
            return image
        out = self.processor(text=self.token, images=[open_image(image)], return_tensors="pt",
                             add_special_tokens=False)
        n = int((out["input_ids"] == self.token_id).sum())
        size = tuple(int(v) for v in out["image_sizes"][0])
        return ImageInput(out["pixel_values"][0].float(), size, n)  # type: ignore[arg-type]

    def encode(self, prompt_ids: Sequence[Sequence[int]], images: Sequence) -> tuple[list[list[int]], ImageSequences]:
        """(prompt ids with their image token expanded, the sequences' `ImageSequences`)."""
        if len(prompt_ids) != len(images):
            raise T2EvalError(f"{len(prompt_ids)} prompts but {len(images)} images: one image per prompt")
        inputs = [self.image_input(im) for im in images]
        ids = [expand_image_tokens(p, self.token_id, x.n_tokens) for p, x in zip(prompt_ids, inputs)]
        return ids, ImageSequences(inputs, self.dtype, self.device)

    def plain_completions(self, completions: Sequence[str], completion_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        """Completion ids without image tokens: a completion whose text spells the image token is tokenised
        with special tokens split (the forward would otherwise look for image features it has no image for)."""
        return [list(c) if self.token_id not in c else
                self.tokenizer(t, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                for t, c in zip(completions, completion_ids)]


class HFVLMBackend(HFBackend):
    """`hf.HFBackend` for a vision-language model: ``generate(prompts, ..., images=[one per prompt])``."""

    name = "hf"

    def __init__(self, model_dir=None, *, processor, model=None, **kwargs):
        super().__init__(model_dir, model=model, tokenizer=processor.tokenizer, **kwargs)
        self.processor = processor
        self.images = ImageEncoder(processor, dtype=self.model.dtype, device=self.device)

    def _prepare(self, prompts: Sequence[str], images: Sequence | None = None, **inputs):
        if inputs or images is None:  # text-only prompts generate as on a text model
            return super()._prepare(prompts, **inputs)
        return self.images.encode([self.encode(p) for p in prompts], images)
