"""Vision-language models (issue 10): the offline LLaVA-NeXT builders, loading, SVD scope on a VLM."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from t2eval.models.llava import IMAGE_TOKEN, build_smollm2_llava, build_tiny_llava_next, tiny_llava_next_dir
from t2eval.models.loading import is_vision_language, load_model, load_processor


@pytest.fixture(scope="module")
def tiny_vlm():
    return tiny_llava_next_dir(0)


def vlm_inputs(d, text="What does the sign say?", size=(40, 30)):
    proc = load_processor(str(d))
    img = Image.new("RGB", size, (200, 30, 30))
    return proc(images=img, text=f"{IMAGE_TOKEN}\n{text}", return_tensors="pt")


def test_tiny_llava_next_builds_deterministically_and_loads(tiny_vlm, tiny_model, tmp_path):
    again = build_tiny_llava_next(tmp_path / "again", seed=0)
    other = build_tiny_llava_next(tmp_path / "other", seed=1)
    a, b, c = (load_file(d / "model.safetensors") for d in (tiny_vlm, again, other))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].ndim == 2)
    assert is_vision_language(tiny_vlm) and not is_vision_language(tiny_model)
    assert type(load_model(str(tiny_model))).__name__ == "LlamaForCausalLM"
    m = load_model(str(tiny_vlm))
    assert type(m).__name__ == "LlavaNextForConditionalGeneration" and not m.training
    assert m.config.text_config.num_hidden_layers == 2
    inp = vlm_inputs(tiny_vlm)
    n_img = int((inp["input_ids"] == m.config.image_token_index).sum())
    assert n_img > 16 and inp["pixel_values"].ndim == 5
    with torch.no_grad():
        logits = m(**inp).logits
    assert logits.shape[:2] == inp["input_ids"].shape and torch.isfinite(logits).all()
    with torch.no_grad():  # the image matters: another image gives other logits
        other_img = dict(inp, pixel_values=inp["pixel_values"].flip(-1))
        assert not torch.allclose(m(**other_img).logits, logits)
    meta = json.loads((tiny_vlm / "t2eval_model.json").read_text())
    assert meta["key"] == "tiny-llava-next" and meta["seed"] == 0


def test_smollm2_llava_language_model_is_smollm2(smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    d = build_smollm2_llava(tmp_path / "smollm2-llava", seed=0, text_model=smollm2_dir)
    vlm, lm = load_model(str(d)), AutoModelForCausalLM.from_pretrained(smollm2_dir)
    ids = torch.tensor([[1, 504, 2533, 314, 253, 1345]])
    with torch.no_grad():
        a, b = vlm(input_ids=ids).logits, lm(input_ids=ids).logits
    assert a.shape[-1] == b.shape[-1] + 1  # + the <image> token
    assert torch.equal(a[..., : b.shape[-1]], b)  # real SmolLM2 weights, bit-identical text path
    meta = json.loads((d / "t2eval_model.json").read_text())
    assert "reads the OCR tokens, not the pixels" in meta["note"]
    with torch.no_grad():
        out = vlm(**vlm_inputs(d)).logits
    assert torch.isfinite(out).all()
