"""SVF REINFORCE on a vision-language model (issue 10), on the tiny LLaVA-NeXT: rollouts with images, the
batched PG loss with each sequence's images, frozen vision tower/projector, constant z, resume."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import per_sample_pg
from t2eval.data.synth_textvqa import generate_item
from t2eval.errors import T2EvalError
from t2eval.models.llava import IMAGE_TOKEN
from t2eval.tasks import vqa


class SynthVQA:
    """A small image task over synth_textvqa rows (the interface `rollout.ImageTask`): the VQA reward."""

    key = "synth_vqa_test"
    modality = "image"
    gen_kwargs = {"max_new_tokens": 3, "stop": ["\n"]}
    SIZES = {"train": 6, "valid": 3, "test": 0}

    def docs(self, split, data_dir=None):
        out = []
        for i in range(self.SIZES[split]):
            row, png = generate_item(split, i, seed=0)
            out.append(dict(row, doc_id=row["question_id"], image=Image.open(io.BytesIO(png)).convert("RGB")))
        return out

    def prompt(self, tokenizer, doc, family=None):
        text = f"{IMAGE_TOKEN}\n{doc['question']} Answer with one word or phrase."
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)

    def reference(self, doc):
        return doc["answer"]

    def accuracy_batch(self, docs, completions):
        return [vqa.vqa_accuracy(c, d["answers"]) for d, c in zip(docs, completions)]

    def reward(self, doc, completion):
        return vqa.reward(completion, doc["answers"])


@pytest.fixture(scope="module")
def loaded(tiny_vlm, vlm_svd):
    from t2eval.models.loading import load_model, load_processor
    from t2eval.svd import load_svd

    return load_model(str(tiny_vlm)), load_processor(str(tiny_vlm)), load_svd(vlm_svd)


# deliberately different prompt lengths (and images of different sizes: 70-88 image tokens, 2 or 5 patches),
# ordered so that the length sort of the micro-batcher is not the identity
QUESTIONS = ["What?", "What is written on the sign in the picture, in capital letters, exactly as shown there?",
             "Which word is it?", "Read the text in the image. " * 6 + "What does it say?", "Price?"]
COMPLETIONS = [" GARDEN", " stop here now", " acme", "", " $57.29 and more words to read"]


def _images():
    imgs = [Image.open(io.BytesIO(generate_item("train", i, seed=0)[1])).convert("RGB") for i in range(3)]
    imgs.append(Image.new("RGB", (24, 20), (30, 90, 170)))   # a small image: 2 patches, not 5
    imgs.append(Image.new("RGB", (60, 28), (240, 200, 40)))
    return imgs


def _prompt(tok, q):
    return tok.apply_chat_template([{"role": "user", "content": f"{IMAGE_TOKEN}\n{q}"}], tokenize=False,
                                   add_generation_prompt=True)


def _batch(processor, model):
    from t2eval.backends.hf_vlm import ImageEncoder
    from t2eval.train import losses

    tok = processor.tokenizer
    prompts = [_prompt(tok, q) for q in QUESTIONS]
    p_ids, c_ids = losses.loss_inputs(tok, prompts, COMPLETIONS, bos="double")
    enc = ImageEncoder(processor, dtype=model.dtype)
    p_ids, seqs = enc.encode(p_ids, _images())
    return prompts, p_ids, c_ids, seqs


def _rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


# ------------------------------------------------------------------------------------------ the PG loss
def test_image_tokens_expand_as_the_processor_does(loaded):
    model, processor, _ = loaded
    prompts, p_ids, _, seqs = _batch(processor, model)
    assert len({len(p) for p in p_ids}) == len(p_ids)
    assert len({x.pixel_values.shape[0] for x in seqs.inputs}) > 1  # small images have fewer patches
    for p, ids, img, x in zip(prompts, p_ids, _images(), seqs.inputs):
        ref = processor(text=p, images=[img], return_tensors="pt")  # the processor's own expansion
        assert ids == ref["input_ids"][0].tolist()
        assert torch.equal(x.pixel_values, ref["pixel_values"][0]) and list(x.image_size) == ref["image_sizes"][0].tolist()


@pytest.mark.parametrize("max_pad_frac", [1.0, 0.0])  # padded micro-batches of 3 / one sequence each
def test_batched_pg_step_with_images_equals_per_sample_loop(loaded, monkeypatch, max_pad_frac):
    from t2eval import svf
    from t2eval.train import losses
    from t2eval.train.reinforce import svf_policy_gradient

    monkeypatch.setattr(losses, "MAX_PAD_FRAC", max_pad_frac)
    model, processor, svd = loaded
    prompts, p_ids, c_ids, seqs = _batch(processor, model)
    rewards = [1.0, -0.1, 1.0, -0.1, -0.1]
    z0 = svf.init_z(svd, seed=3)
    policy = svf.SVFModule(model, svd, z0)
    stats = svf_policy_gradient(policy, p_ids, c_ids, losses.pg_weights(rewards), pad_id=processor.tokenizer.pad_token_id,
                                micro_batch=3, extra_inputs=seqs)
    g_batched = torch.cat([p.grad.reshape(-1) for p in policy.z])

    # reference: per sample, unpadded, the processor's own inputs, plain autograd end to end
    z = {n: v.clone().requires_grad_(True) for n, v in z0.items()}
    refs = [processor(text=prompt, images=[img], return_tensors="pt") for prompt, img in zip(prompts, _images())]
    samples = [(ref["input_ids"][0].tolist(), c, r, {"pixel_values": ref["pixel_values"], "image_sizes": ref["image_sizes"]})
               for ref, c, r in zip(refs, c_ids, rewards)]
    total, pg = per_sample_pg(model, svd, z, samples, len(rewards))
    assert torch.linalg.norm(total) > 0
    assert _rel(g_batched, total) <= 1e-6, _rel(g_batched, total)
    assert stats["pg_loss"] == pytest.approx(pg, rel=1e-6)


def test_micro_batches_keep_each_sequence_with_its_image(loaded):
    """The micro-batcher sorts by length: every forward row still gets its own sequence's pixels and size,
    and scoring the sequences with the images shuffled gives another loss."""
    from t2eval.backends.hf_vlm import ImageSequences
    from t2eval.train import losses

    model, processor, _ = loaded
    _, p_ids, c_ids, seqs = _batch(processor, model)
    pad = processor.tokenizer.pad_token_id
    seen = []

    def recording_forward(**kw):
        seen.append({k: kw[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")})
        return model(**kw)

    w = [0.2] * len(p_ids)
    stats = losses.sequence_loss_backward(recording_forward, p_ids, c_ids, w, pad_id=pad, micro_batch=2,
                                          backward=False, extra_inputs=seqs)
    rows = []
    for call in seen:
        for r in range(call["input_ids"].shape[0]):
            ids = call["input_ids"][r][call["attention_mask"][r].bool()].tolist()
            j = next(j for j in range(len(p_ids)) if p_ids[j] + c_ids[j] == ids)
            x = seqs.inputs[j]
            n = x.pixel_values.shape[0]
            assert torch.equal(call["pixel_values"][r, :n], x.pixel_values)
            assert not call["pixel_values"][r, n:].any()  # zero padding of the patches only
            assert call["image_sizes"][r].tolist() == list(x.image_size)
            rows.append(j)
    assert sorted(rows) == list(range(len(p_ids)))  # every sequence once (the empty completion too)
    assert rows != sorted(rows)  # the micro-batches were reordered by length
    assert rows[0] == max(range(len(p_ids)), key=lambda j: len(p_ids[j]) + len(c_ids[j]))

    # the same images in another order: the loss sees them (same token counts needed, so swap two equal-size ones)
    n_tok = [x.n_tokens for x in seqs.inputs]
    a, b = next((a, b) for a in range(5) for b in range(a + 1, 5) if n_tok[a] == n_tok[b] and c_ids[a] and c_ids[b]
                and not torch.equal(seqs.inputs[a].pixel_values, seqs.inputs[b].pixel_values))
    swapped = list(seqs.inputs)
    swapped[a], swapped[b] = swapped[b], swapped[a]
    other = losses.sequence_loss_backward(model, p_ids, c_ids, w, pad_id=pad, micro_batch=2, backward=False,
                                          extra_inputs=ImageSequences(swapped))
    assert abs(other["pg_loss"] - stats["pg_loss"]) > 1e-6


def test_kl_with_images_zero_at_constant_z_positive_after_a_change(loaded):
    from t2eval import svf
    from t2eval.train import losses

    model, processor, svd = loaded
    _, p_ids, c_ids, seqs = _batch(processor, model)
    w, pad = losses.pg_weights([1.0] * 5), processor.tokenizer.pad_token_id
    const = svf.SVFModule(model, svd, {n: torch.full((svd.rank(n),), 0.3) for n in svd.names})
    at_base = losses.sequence_loss_backward(const, p_ids, c_ids, w, pad_id=pad, micro_batch=2, kl_coef=0.1,
                                            ref_forward=model, backward=False, extra_inputs=seqs)
    assert abs(at_base["kl"]) <= 1e-6
    g = torch.Generator().manual_seed(0)
    moved = svf.SVFModule(model, svd, {n: torch.randn(svd.rank(n), generator=g) for n in svd.names})
    off = losses.sequence_loss_backward(moved, p_ids, c_ids, w, pad_id=pad, micro_batch=2, kl_coef=0.1,
                                        ref_forward=model, backward=False, extra_inputs=seqs)
    assert off["kl"] > 1e-4 and off["loss"] == pytest.approx(off["pg_loss"] + 0.1 * off["kl"], rel=1e-6)


def test_training_batch_of_an_image_task(loaded):
    """pg: the rollout's images go with its sequences; ntp: the docs' images, references + EOS; a completion
    spelling the image token is scored as text."""
    from t2eval.backends.hf_vlm import ImageEncoder, ImageSequences
    from t2eval.train import loop
    from t2eval.train.rollout import Rollout

    model, processor, _ = loaded
    tok, task = processor.tokenizer, SynthVQA()
    enc = ImageEncoder(processor)
    docs = task.docs("train")[:3]
    prompts = [task.prompt(tok, d) for d in docs]
    comps = [" GARDEN", f" {IMAGE_TOKEN} x", ""]
    ro = Rollout(docs=docs, prompts=prompts, completions=comps, n_tokens=[1, 1, 0], correct=[True, False, False],
                 rewards=[1.0, -0.1, -0.1], scores=[1.0, 0.0, 0.0], images=[d["image"] for d in docs])
    p_ids, c_ids, weights, rewards, extra = loop.training_batch("pg", tok, task, docs, None, lambda: ro,
                                                                image_encoder=enc)
    assert isinstance(extra, ImageSequences) and len(extra) == 3
    assert weights == pytest.approx([1 / 3, -0.1 / 3, -0.1 / 3]) and rewards == [1.0, -0.1, -0.1]
    for p, d, x in zip(p_ids, docs, extra.inputs):
        assert p == processor(text=task.prompt(tok, d), images=[d["image"]], return_tensors="pt")["input_ids"][0].tolist()
        assert p.count(enc.token_id) == x.n_tokens
    assert all(enc.token_id not in c for c in c_ids) and tok.decode(c_ids[1]) == f" {IMAGE_TOKEN} x"
    p2, c2, w2, r2, extra2 = loop.training_batch("ntp", tok, task, docs, None, None, image_encoder=enc)
    assert p2 == p_ids and all(c[-1] == tok.eos_token_id for c in c2) and r2 == []
    assert all(torch.equal(a.pixel_values, b.pixel_values) for a, b in zip(extra.inputs, extra2.inputs))


def test_doc_images_from_pil_path_or_bytes(tmp_path):
    from t2eval.backends.hf_vlm import open_image
    from t2eval.train.rollout import doc_image, is_image_task

    row, png = generate_item("valid", 0, seed=0)
    path = tmp_path / "a.png"
    path.write_bytes(png)
    ref = Image.open(io.BytesIO(png)).convert("RGB")
    for src in (ref, str(path), path, png, ref.convert("RGBA")):
        assert open_image(src).tobytes() == ref.tobytes()
    with pytest.raises(T2EvalError, match="not found"):
        open_image(tmp_path / "missing.png")
    task = SynthVQA()
    assert is_image_task(task) and doc_image(task, {"image": str(path)}) == str(path)
    with pytest.raises(T2EvalError, match="has no image"):
        doc_image(task, {"doc_id": "x"})

    class OwnLoader(SynthVQA):  # a task with relative paths resolves them itself
        def image(self, doc):
            return open_image(tmp_path / doc["image"])

    assert open_image(doc_image(OwnLoader(), {"image": "a.png"})).tobytes() == ref.tobytes()


def test_generation_with_images_batched_equals_one_by_one(loaded, vlm_svd):
    from t2eval.backends import make_backend

    model, processor, svd = loaded
    be = make_backend("hf", None, model=model, tokenizer=processor.tokenizer, processor=processor, svd=svd,
                      batch_size=4)
    prompts = [_prompt(processor.tokenizer, q) for q in QUESTIONS]
    imgs = _images()
    together = be.generate(prompts, max_new_tokens=4, images=imgs)
    alone = [be.generate([p], max_new_tokens=4, images=[im])[0] for p, im in zip(prompts, imgs)]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    # the image matters: other images, other greedy tokens somewhere
    assert [g.token_ids for g in be.generate(prompts, max_new_tokens=4, images=imgs[::-1])] != \
        [g.token_ids for g in together]
    with pytest.raises(T2EvalError, match="one image per prompt"):
        be.generate(prompts, max_new_tokens=1, images=imgs[:2])
    with pytest.raises(T2EvalError, match="exactly one image token"):
        be.generate([prompts[0] + IMAGE_TOKEN], max_new_tokens=1, images=imgs[:1])
    text_only = make_backend("hf", None, model=model, tokenizer=processor.tokenizer, svd=svd)
    with pytest.raises(T2EvalError, match="takes no images"):
        text_only.generate(prompts, max_new_tokens=1, images=imgs)


# ------------------------------------------------------------------------------------------ the learner
def _cfg(tiny_vlm, vlm_svd, out, **kw):
    from t2eval.train.reinforce import SVFTrainConfig

    base = dict(model=str(tiny_vlm), svd=str(vlm_svd), task="synth_vqa_test", out=str(out), iterations=2,
                batch_size=4, micro_batch=2, max_new_tokens=3, eval_every=1, eval_splits=("valid",), lr=0.5,
                grad_clip=1.0, seed=1, progress=False)
    base.update(kw)
    return SVFTrainConfig(**base)


def _ckpt_z(out):
    return torch.load(Path(out) / "checkpoints" / "latest.pt", weights_only=False)["z"]


def test_constant_z_keeps_logits_with_an_image_and_generation_restores_bit_exactly(tiny_vlm, vlm_svd, tmp_path):
    from t2eval import svf
    from t2eval.train.reinforce import SVFLearner

    learner = SVFLearner(_cfg(tiny_vlm, vlm_svd, tmp_path))
    model, processor = learner.model, learner.processor
    _, p_ids, c_ids, seqs = _batch(processor, model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = [p + c for p, c in zip(p_ids, c_ids)][:2]
    from t2eval.backends.hf import left_pad

    inp, mask, pos = left_pad(ids, processor.tokenizer.pad_token_id)
    kw = dict(input_ids=inp, attention_mask=mask, position_ids=pos, **seqs([0, 1]))
    with torch.no_grad():
        base = model(**kw).logits
        const = svf.SVFModule(model, learner.svd, {n: torch.full((learner.svd.rank(n),), 0.3) for n in learner.svd.names})
        assert (const(**kw).logits - base).abs().max().item() <= 1e-5
    backend = learner.make_backend(learner.cfg)
    prompts = [_prompt(processor.tokenizer, q) for q in QUESTIONS[:2]]
    with learner.generating(backend):  # W′(z) written into the shared model for the rollouts
        assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
        backend.generate(prompts, max_new_tokens=2, images=_images()[:2])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # bit-exact restore
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, base)


def test_training_changes_only_z_never_the_vision_tower_or_projector(tiny_vlm, vlm_svd, tmp_path):
    from t2eval.train import loop
    from t2eval.train.reinforce import SVFLearner

    cfg = _cfg(tiny_vlm, vlm_svd, tmp_path, iterations=1)
    torch.manual_seed(cfg.seed)
    learner = SVFLearner(cfg)
    model = learner.model
    assert all(n.startswith("model.language_model.layers.") for n in learner.svd.names)
    frozen = {n: p for n, p in model.named_parameters() if n.startswith(("model.vision_tower.", "model.multi_modal_projector."))}
    assert frozen and "model.image_newline" in dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    z0 = learner.state()
    summary = loop.train(cfg, learner, SynthVQA())
    assert summary["finished"]
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # vision, projector, LM: bit-identical
    z1 = learner.state()
    assert any(not torch.equal(z0[n], z1[n]) for n in z0)  # the step moved z
    row = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert row["reward_mean"] is not None and set(row["split_scores"]) == {"valid"}
    assert vqa.WRONG_REWARD <= row["reward_mean"] <= 1.0  # binary VQA rewards: +1 / −0.1


def test_svd_outside_the_language_model_and_text_models_are_refused(tiny_vlm, tmp_path):
    from t2eval.svd import decompose
    from t2eval.testing import tiny_model_dir
    from t2eval.train.reinforce import SVFLearner, train_svf

    wide = tmp_path / "all-attn.safetensors"
    decompose(tiny_vlm, "attn", wide, scope="all")
    with pytest.raises(T2EvalError, match="language-model matrices only"):
        SVFLearner(_cfg(tiny_vlm, wide, tmp_path / "a"))
    text = tiny_model_dir(0)
    svd = tmp_path / "text.safetensors"
    decompose(text, "mlp", svd)
    with pytest.raises(T2EvalError, match="has images"):
        train_svf(_cfg(text, svd, tmp_path / "b"), task=SynthVQA())


def test_two_iterations_interrupted_and_resumed_give_the_same_z(tiny_vlm, vlm_svd, tmp_path):
    from t2eval.svf import ExpertVector
    from t2eval.train.reinforce import train_svf

    full = train_svf(_cfg(tiny_vlm, vlm_svd, tmp_path / "full"), task=SynthVQA())
    assert full["finished"] and full["iterations_done"] == 2
    cfg = _cfg(tiny_vlm, vlm_svd, tmp_path / "resumed", stop_after=1)
    first = train_svf(cfg, task=SynthVQA())
    assert not first["finished"]
    cfg.stop_after = None
    train_svf(cfg, task=SynthVQA())
    a, b = _ckpt_z(tmp_path / "full"), _ckpt_z(tmp_path / "resumed")
    assert all(torch.equal(a[n], b[n]) for n in a)
    za = ExpertVector.load(tmp_path / "full" / "z.safetensors").z
    zb = ExpertVector.load(tmp_path / "resumed" / "z.safetensors").z
    assert all(torch.equal(za[n], zb[n]) for n in za)
    rows = lambda d: [{k: v for k, v in json.loads(x).items() if k != "time"}  # noqa: E731
                      for x in (d / "log.jsonl").read_text().splitlines()]
    assert rows(tmp_path / "full") == rows(tmp_path / "resumed")
    from t2eval.svd import load_svd
    from t2eval.svf import init_z

    z_init = init_z(load_svd(vlm_svd), seed=1)
    assert any(not torch.equal(a[n], z_init[n]) for n in a)  # two steps did move z
