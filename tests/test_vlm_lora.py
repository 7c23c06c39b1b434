"""The LoRA baseline on a vision-language model (issue 10), on the tiny LLaVA-NeXT: the adapter sits on the
language model only (CLIP has q_proj/v_proj too), next-token prediction sees each sequence's image, the
vision tower and projector never change, resume is exact. (That train-lora's adapter evaluates in multimodal
mode is checked by the micro DAG: tests/test_dag_micro.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from test_vlm_rl import SynthVQA  # the same small image task (synth_textvqa rows, VQA reward)


def _cfg(tiny_vlm, out, **kw):
    from t2eval.train.lora import LoRATrainConfig

    base = dict(model=str(tiny_vlm), task="synth_vqa_test", out=str(out), iterations=2, batch_size=4, micro_batch=2,
                max_new_tokens=3, eval_every=1, eval_splits=("valid",), lr=5e-2, rank=4, alpha=8, dropout=0.0,
                seed=1, progress=False)
    base.update(kw)
    return LoRATrainConfig(**base)


def test_target_modules_scope_the_language_model():
    from t2eval.train.lora import target_modules

    assert target_modules("attn") == ["q_proj", "v_proj"]  # a text model: every module so named
    rx = target_modules("mlp+attn", "model.language_model")
    assert re.fullmatch(rx, "model.language_model.layers.3.self_attn.q_proj")
    assert re.fullmatch(rx, "model.language_model.layers.0.mlp.down_proj")
    assert not re.fullmatch(rx, "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj")
    assert not re.fullmatch(rx, "model.language_model.layers.0.self_attn.k_proj")
    assert not re.fullmatch(rx, "model.language_modelX.layers.0.self_attn.q_proj")


def test_adapter_on_the_language_model_only(tiny_vlm, tmp_path):
    from t2eval.train.lora import LoRALearner

    learner = LoRALearner(_cfg(tiny_vlm, tmp_path))
    assert learner.processor is not None and learner.image_encoder is not None
    lora = [n for n in learner._params]
    vision_qv = [n for n, _ in learner.model.named_modules() if ".vision_tower." in n and n.endswith(("q_proj", "v_proj"))]
    assert vision_qv  # the vision tower has the projections the text targets name...
    assert lora and all(".language_model.layers." in n and ("q_proj" in n or "v_proj" in n) for n in lora)
    n_layers = learner.model.config.text_config.num_hidden_layers
    assert len(lora) == n_layers * 2 * 2  # ...but only the language model's q, v get A and B


def test_ntp_step_sees_the_images(tiny_vlm, tmp_path):
    """The NTP loss of a batch depends on its images (the forward gets each sequence's pixel values): the
    same batch with the images swapped between sequences gives another loss and gradient."""
    from t2eval.train import loop

    from t2eval.train.lora import LoRALearner

    learner = LoRALearner(_cfg(tiny_vlm, tmp_path))
    task = SynthVQA()
    docs = task.docs("train")[:2]
    tok = learner.tokenizer
    p_ids, c_ids, w, _, extra = loop.training_batch("ntp", tok, task, docs, "llama", None,
                                                    image_encoder=learner.image_encoder)
    assert extra is not None and [len(c) for c in c_ids] == [len(tok(task.reference(d), add_special_tokens=False)
                                                                  ["input_ids"]) + 1 for d in docs]  # + EOS
    for p in learner.params():  # B = 0 at init would hide the image's effect on the LoRA gradient of A
        torch.nn.init.normal_(p, std=0.05)
    losses = []
    for order in ([0, 1], [1, 0]):
        swapped = docs[0] | {"image": docs[order[0]]["image"]}, docs[1] | {"image": docs[order[1]]["image"]}
        p_ids, c_ids, w, _, ex = loop.training_batch("ntp", tok, task, list(swapped), "llama", None,
                                                     image_encoder=learner.image_encoder)
        for p in learner.params():
            p.grad = None
        out = learner.loss_backward(p_ids, c_ids, w, extra_inputs=ex)
        losses.append((out["loss"], torch.cat([p.grad.flatten() for p in learner.params()]).clone()))
    assert losses[0][0] != pytest.approx(losses[1][0], abs=1e-7)
    assert not torch.allclose(losses[0][1], losses[1][1])


def test_training_moves_only_the_adapter_and_resume_is_exact(tiny_vlm, tmp_path):
    from safetensors.torch import load_file

    from t2eval.train.lora import LoRALearner, train_lora

    learner = LoRALearner(_cfg(tiny_vlm, tmp_path / "probe"))
    before = {n: p.detach().clone() for n, p in learner.model.get_base_model().named_parameters() if "lora_" not in n}

    full = train_lora(_cfg(tiny_vlm, tmp_path / "full"), task=SynthVQA())
    assert full["finished"]
    adapter = load_file(tmp_path / "full" / "adapter_model.safetensors")
    assert adapter and all(".language_model.layers." in k for k in adapter)
    cfg_json = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert "language_model" in str(cfg_json["target_modules"])  # the scoped regex is what evaluation reloads
    rows = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] is not None and "valid" in r["split_scores"] for r in rows)

    # frozen: a training step of the probe learner leaves every base weight (vision, projector, LM) bit-identical
    loop_cfg = _cfg(tiny_vlm, tmp_path / "probe", iterations=1)
    from t2eval.train import loop

    a0 = learner.state()
    loop.train(loop_cfg, learner, SynthVQA())
    after = dict(learner.model.get_base_model().named_parameters())
    assert all(torch.equal(after[n], t) for n, t in before.items())
    assert any(not torch.equal(a0[n], v) for n, v in learner.state().items())

    # interrupted after one iteration, resumed: the same adapter as the uninterrupted run
    cut = _cfg(tiny_vlm, tmp_path / "cut", stop_after=1)
    first = train_lora(cut, task=SynthVQA())
    assert not first["finished"]
    train_lora(_cfg(tiny_vlm, tmp_path / "cut"), task=SynthVQA())
    resumed = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    assert resumed.keys() == adapter.keys() and all(torch.equal(resumed[k], adapter[k]) for k in adapter)
