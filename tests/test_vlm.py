"""Vision-language models (issue 10): the offline LLaVA-NeXT builders, loading, SVD scope on a VLM."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from t2eval.models.llava import IMAGE_TOKEN, build_smollm2_llava, build_tiny_llava_next
from t2eval.models.loading import is_vision_language, load_model, load_processor


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
    assert (again / "provenance.json").exists() and not (tmp_path / "again.partial").exists()
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
    # real SmolLM2 weights: the embeddings are bit-identical; the logits agree to float noise (the extra <image>
    # row of the head changes the matmul's shape, hence BLAS's blocking, with the thread count)
    v = b.shape[-1]
    assert torch.equal(vlm.get_input_embeddings().weight[:v], lm.get_input_embeddings().weight)
    assert torch.allclose(a[..., :v], b, atol=1e-3, rtol=1e-5), (a[..., :v] - b).abs().max()
    meta = json.loads((d / "t2eval_model.json").read_text())
    assert "reads the OCR tokens, not the pixels" in meta["note"]
    with torch.no_grad():
        out = vlm(**vlm_inputs(d)).logits
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------- SVD scope on a VLM

def test_svd_names_and_scope_on_llava(tiny_vlm, tiny_model):
    from t2eval import svd as S

    mlp = S.target_names(tiny_vlm, "mlp")
    assert mlp == [f"model.language_model.layers.{i}.mlp.{k}_proj.weight" for i in (0, 1) for k in ("down", "gate", "up")]
    # CLIP's encoder has q_proj/v_proj too: the default scope keeps only the language model's
    attn = S.target_names(tiny_vlm, "attn")
    assert attn and all(n.startswith("model.language_model.layers.") for n in attn)
    wide = S.target_names(tiny_vlm, "attn", scope="all")
    assert any(n.startswith("model.vision_tower.") for n in wide) and set(attn) < set(wide)
    assert S.target_names(tiny_vlm, "mlp", "half") == mlp[3:]  # 2 text layers (text config), upper half
    lay = S.model_layout(tiny_vlm)
    assert lay["language_prefix"] == "model.language_model" and lay["num_layers"] == 2
    assert lay["module_to_checkpoint"][mlp[0]] == "language_model.model.layers.0.mlp.down_proj.weight"
    # in memory the same names come from the loaded model
    assert S.target_names(load_model(str(tiny_vlm)), "attn") == attn
    # text-only models: transformers' mapping is the identity, so the fast path changes no name
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    with torch.device("meta"):
        llama = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model))
    conv = get_model_conversion_mapping(llama)
    ren = [c for c in conv if isinstance(c, WeightRenaming)]
    cvt = [c for c in conv if isinstance(c, WeightConverter)]
    ident = S.model_layout(tiny_model)["module_to_checkpoint"]
    assert all(rename_source_key(k, ren, cvt)[0] == k for k in ident) and all(k == v for k, v in ident.items())


def test_svd_decompose_vlm_and_constant_z_keeps_logits_with_image(tiny_vlm, tmp_path):
    from t2eval import svd as S
    from t2eval import svf

    out = tmp_path / "vlm-mlp.safetensors"
    man = S.decompose(tiny_vlm, "mlp", out)
    assert man["names"] == S.target_names(tiny_vlm, "mlp") and man["num_layers"] == 2
    assert man["scope"] == "language" and man["scope_prefix"] == "model.language_model"
    assert man["checkpoint_names"]["model.language_model.layers.1.mlp.up_proj.weight"] == \
        "language_model.model.layers.1.mlp.up_proj.weight"
    assert not any("vision" in n or "projector" in n for n in man["names"])
    cache = S.load_svd(out, expect_model=tiny_vlm, expect_targets="mlp", expect_scope="language")
    with pytest.raises(S.StaleCacheError, match="scope"):
        S.load_svd(out, expect_scope="all")
    assert S.ensure_svd(tiny_vlm, "mlp", out).names == man["names"]  # reused, not rebuilt

    model = load_model(str(tiny_vlm))
    inp = vlm_inputs(tiny_vlm)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        base = model(**inp).logits
    patcher = svf.SVFPatcher(model, cache)
    const = {n: torch.full((cache.rank(n),), 0.3) for n in cache.names}  # code param: constant z -> W' = W
    patcher.apply(svf.scales(const, cache, param="code"))
    with torch.no_grad():
        same = model(**inp).logits
    assert (same - base).abs().max().item() <= 1e-5
    g = torch.Generator().manual_seed(0)
    patcher.apply(svf.scales({n: torch.randn(cache.rank(n), generator=g) for n in cache.names}, cache, param="code"))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(cache.names)  # vision tower, projector, embeddings untouched
    with torch.no_grad():
        assert not torch.allclose(model(**inp).logits, base, atol=1e-5)
    patcher.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # bit-exact restore
    with torch.no_grad():
        assert torch.equal(model(**inp).logits, base)


def test_svf_module_trains_z_through_the_vlm_with_an_image(tiny_vlm, tmp_path):
    """The training path (svf.SVFModule) works on the VLM as is: gradients reach z with pixel values
    in the batch, and an optimizer step changes nothing but z (vision tower and projector frozen)."""
    from t2eval import svd as S
    from t2eval import svf

    cache = S.ensure_svd(tiny_vlm, "mlp", tmp_path / "c.safetensors")
    model = load_model(str(tiny_vlm))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mod = svf.SVFModule(model, cache, {n: torch.full((cache.rank(n),), 0.1) for n in cache.names})
    inp = vlm_inputs(tiny_vlm)
    opt = torch.optim.Adam(mod.parameters(), lr=1e-2)
    out = mod(**inp, labels=inp["input_ids"])
    out.loss.backward()
    assert all(z.grad is not None and z.grad.abs().sum() > 0 for z in mod.z)
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # base weights untouched
    assert any(not torch.allclose(z, torch.full_like(z, 0.1)) for z in mod.z)
