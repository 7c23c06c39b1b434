"""SVF REINFORCE training on the tiny model: batched gradient, KL, resume, NaN guard, best-valid, CLI."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import pytest
import torch

from conftest import per_sample_pg
from t2eval.errors import T2EvalError

STOP = ["Instruction:", "Instruction", "Response:", "Response"]
WORDS = ["apple", "river", "stone", "cloud", "table", "music", "green", "seven", "light", "north",
         "paper", "horse", "glass", "dream", "smile", "chair", "ocean", "tiger", "bread", "field"]


class ToyTask:
    """A real (if silly) task: chat prompts, a deterministic scorer that depends on the text.

    "Correct" = the crc32 of the completion is even: arbitrary, but it reacts to any change of
    the generated text, so rewards are ±1 mixes and validation scores move when z moves.
    """

    key = "toy"
    metric = "acc"
    gen_kwargs = {"max_new_tokens": 4, "stop": STOP}

    def docs(self, split, data_dir=None):
        start = {"train": 0, "valid": 8, "test": 12}[split]
        n = {"train": 8, "valid": 4, "test": 2}[split]
        return [{"doc_id": f"toy/{i}", "q": f"Write about the {WORDS[i]}.", "ref": f"The {WORDS[i]} is nice."}
                for i in range(start, start + n)]

    def prompt(self, tokenizer, doc, family=None):
        return tokenizer.apply_chat_template([{"role": "user", "content": doc["q"]}], tokenize=False,
                                             add_generation_prompt=True)

    def reference(self, doc):
        return doc["ref"]

    def score_batch(self, docs, completions):
        return [zlib.crc32(c.encode()) % 2 == 0 for c in completions]


@pytest.fixture(scope="module")
def loaded(tiny, svd_path):
    from t2eval.models.loading import load_model, load_tokenizer
    from t2eval.svd import load_svd

    return load_model(str(tiny)), load_tokenizer(str(tiny)), load_svd(svd_path)


def _batch(tok, n=5):
    from t2eval.train.rollout import encode_completions

    task = ToyTask()
    docs = task.docs("train")[:n]
    prompts = [task.prompt(tok, d) for d in docs]
    comps = ["yes", " the river runs far away", "", "Seven seas and more", "ok ok ok ok ok ok ok ok"][:n]
    return encode_completions(tok, prompts, comps)


def _rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("max_pad_frac", [1.0, 0.0])  # padded micro-batches of 3 / one sequence each
def test_batched_gradient_equals_per_sample(loaded, monkeypatch, max_pad_frac):
    from t2eval import svf
    from t2eval.train import losses
    from t2eval.train.reinforce import svf_policy_gradient

    monkeypatch.setattr(losses, "MAX_PAD_FRAC", max_pad_frac)
    model, tok, svd = loaded
    p_ids, c_ids = _batch(tok)
    rewards = [1.0, -1.0, 1.0, -1.0, -1.0]
    z0 = svf.init_z(svd, seed=3)
    policy = svf.SVFModule(model, svd, z0)
    stats = svf_policy_gradient(policy, p_ids, c_ids, losses.pg_weights(rewards), pad_id=tok.pad_token_id,
                                micro_batch=3)
    g_batched = torch.cat([p.grad.reshape(-1) for p in policy.z])

    # reference: the per-sample formula, unpadded, plain autograd end to end
    z = {n: v.clone().requires_grad_(True) for n, v in z0.items()}
    total, pg = per_sample_pg(model, svd, z, [(p, c, r, {}) for p, c, r in zip(p_ids, c_ids, rewards)], len(rewards))
    assert torch.linalg.norm(total) > 0
    assert _rel(g_batched, total) <= 1e-5
    assert stats["pg_loss"] == pytest.approx(pg, rel=1e-5)


def test_micro_batches_cover_every_sequence_and_cap_padding():
    from t2eval.train.losses import _micro_batches

    lengths = [400, 150, 390, 160, 380, 155, 100, 395, 5]
    for mb in (1, 2, 3, 8):
        for frac in (0.0, 0.1, 0.25, 1.0):
            groups = _micro_batches(lengths, mb, frac)
            assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
            for g in groups:
                assert len(g) <= mb
                width, real = max(lengths[i] for i in g), sum(lengths[i] for i in g)
                assert width * len(g) - real <= frac * width * len(g) + 1e-9
    assert _micro_batches([7] * 10, 4, 0.0) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # equal lengths fill up
    assert _micro_batches(lengths, 8, 1.0) == [[0, 7, 2, 4, 3, 5, 1, 6], [8]]  # no cap: plain chunks by length
    assert len(_micro_batches(lengths, 8, 0.25)) == 3  # ~390s | ~155s and 100 | 5


def test_kl_zero_at_base_and_positive_after_change(loaded):
    from t2eval import svf
    from t2eval.train import losses

    model, tok, svd = loaded
    p_ids, c_ids = _batch(tok, 4)
    w = losses.pg_weights([1.0] * 4)
    const = {n: torch.full((svd.rank(n),), 0.3) for n in svd.names}  # constant z: W' = W (code param)
    for direction in losses.KL_DIRECTIONS:
        at_base = losses.sequence_loss_backward(svf.SVFModule(model, svd, const), p_ids, c_ids, w,
                                                pad_id=tok.pad_token_id, kl_coef=0.1, ref_forward=model,
                                                kl_direction=direction, backward=False)
        assert abs(at_base["kl"]) < 1e-6
        moved = {n: v + torch.linspace(-2, 2, v.numel()) for n, v in const.items()}
        off = losses.sequence_loss_backward(svf.SVFModule(model, svd, moved), p_ids, c_ids, w,
                                            pad_id=tok.pad_token_id, kl_coef=0.1, ref_forward=model,
                                            kl_direction=direction, backward=False)
        assert off["kl"] > 1e-4
        assert off["loss"] == pytest.approx(off["pg_loss"] + 0.1 * off["kl"], rel=1e-6)


def _cfg(tiny, svd_path, out, **kw):
    from t2eval.train.reinforce import SVFTrainConfig

    base = dict(model=str(tiny), svd=str(svd_path), task="toy", out=str(out), iterations=3, batch_size=4,
                micro_batch=2, max_new_tokens=4, eval_every=1, eval_limit=None, lr=0.5, grad_clip=1.0,
                seed=1, progress=False)
    base.update(kw)
    return SVFTrainConfig(**base)


def _z(path):
    from t2eval.svf import ExpertVector

    return ExpertVector.load(path).z


def _rows(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tiny, svd_path, tmp_path_factory):
    from t2eval.train.reinforce import train_svf

    out = tmp_path_factory.mktemp("full")
    summary = train_svf(_cfg(tiny, svd_path, out), task=ToyTask())
    return out, summary


def test_outputs_log_and_best_valid(full_run):
    out, summary = full_run
    assert summary["finished"]
    for f in ("z.safetensors", "log.jsonl", "checkpoints/latest.pt", "provenance.json"):
        assert (out / f).exists(), f
    rows = _rows(out)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for r in rows:
        for k in ("reward_mean", "reward_std", "pg_loss", "kl", "grad_norm", "z_mean", "z_std", "z_min",
                  "z_max", "lr", "time", "split_scores", "best"):
            assert k in r, k
        assert set(r["split_scores"]) == {"train", "valid", "test"}
        assert set(r["time"]) == {"rollout_s", "grad_s", "eval_s"}
    valids = [r["split_scores"]["valid"] for r in rows]
    best_it = max(range(len(valids)), key=lambda i: (valids[i], -i))  # first maximum
    assert [r["best"] for r in rows].count(True) >= 1
    assert rows[best_it]["best"]
    assert summary["best"]["iteration"] == best_it
    ck = torch.load(out / "checkpoints" / "latest.pt", weights_only=False)
    saved = _z(out / "z.safetensors")
    if best_it != 2:  # the best checkpoint is not the final z: it must be the one at the best iteration
        assert any(not torch.equal(saved[n], ck["z"][n]) for n in saved)
    meta_iter = json.loads(__import__("safetensors").safe_open(out / "z.safetensors", "pt").metadata()["meta"])
    assert meta_iter["training"]["iteration"] == best_it


def test_resume_gives_identical_final_z(full_run, tiny, svd_path, tmp_path):
    from t2eval.train.reinforce import train_svf

    out_full, _ = full_run
    cfg = _cfg(tiny, svd_path, tmp_path, stop_after=1)
    first = train_svf(cfg, task=ToyTask())
    assert not first["finished"] and len(_rows(tmp_path)) == 1
    with open(tmp_path / "log.jsonl", "a") as f:  # a row of an iteration killed before its checkpoint
        f.write('{"iteration": 1, "partial": true}\n')
    cfg.stop_after = None
    train_svf(cfg, task=ToyTask())
    a = torch.load(out_full / "checkpoints" / "latest.pt", weights_only=False)["z"]
    b = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=False)["z"]
    assert all(torch.equal(a[n], b[n]) for n in a)
    za, zb = _z(out_full / "z.safetensors"), _z(tmp_path / "z.safetensors")
    assert all(torch.equal(za[n], zb[n]) for n in za)
    ra, rb = _rows(out_full), _rows(tmp_path)
    assert [r["iteration"] for r in rb] == [0, 1, 2]
    strip = lambda r: {k: v for k, v in r.items() if k != "time"}  # noqa: E731
    assert [strip(r) for r in ra] == [strip(r) for r in rb]


def test_resume_refuses_other_settings(full_run, tiny, svd_path, tmp_path):
    from t2eval.train.reinforce import train_svf

    out_full, _ = full_run
    shutil.copytree(out_full, tmp_path / "run")
    with pytest.raises(T2EvalError, match="other settings.*lr"):
        train_svf(_cfg(tiny, svd_path, tmp_path / "run", lr=0.1), task=ToyTask())


def test_resume_refuses_another_protocol(full_run, tiny, svd_path, tmp_path, monkeypatch):
    """The protocol and its knobs are part of the resume identity (explicit or from $T2EVAL_PROTOCOL)."""
    from t2eval.train.reinforce import train_svf

    out_full, _ = full_run
    shutil.copytree(out_full, tmp_path / "run")
    with pytest.raises(T2EvalError, match="other settings.*bos.*pg_code_prompt.*protocol"):
        train_svf(_cfg(tiny, svd_path, tmp_path / "run", protocol="corrected"), task=ToyTask())
    monkeypatch.setenv("T2EVAL_PROTOCOL", "corrected")
    with pytest.raises(T2EvalError, match="other settings.*protocol"):
        train_svf(_cfg(tiny, svd_path, tmp_path / "run"), task=ToyTask())


def test_fp32_run_keeps_fp32_z_and_adam_state(full_run):
    out, _ = full_run
    ck = torch.load(out / "checkpoints" / "latest.pt", weights_only=False)
    assert {v.dtype for v in ck["z"].values()} == {torch.float32}
    assert {t.dtype for st in ck["optimizer"]["state"].values() for k, t in st.items() if k != "step"} == \
        {torch.float32}
    meta = json.loads(__import__("safetensors").safe_open(out / "z.safetensors", "pt").metadata()["meta"])
    assert meta["svf_precision"] == "fp32" and meta["training"]["protocol"]["name"] == "release"
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["svf_precision"] == "fp32" and prov["rollout_precision"] == "fp32"
    assert prov["protocol"]["name"] == "release" and prov["config"]["protocol"] == "release"
    assert prov["protocol"]["knobs"]["bos"] == "double" and prov["config"]["pg_code_prompt"] == "prefill_turn"


def test_bf16_precision_z_adam_state_and_rollouts(tiny, svd_path, tmp_path):
    """svf_precision=bf16 (the release): z and Adam's states are bf16, one iteration runs, the HF
    rollouts see W′ composed in bf16, and the expert/provenance say so."""
    from t2eval import svf
    from t2eval.train import loop
    from t2eval.train.reinforce import SVFLearner, train_svf

    summary = train_svf(_cfg(tiny, svd_path, tmp_path, svf_precision="bf16", iterations=1), task=ToyTask())
    assert summary["finished"]
    ck = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=False)
    assert {v.dtype for v in ck["z"].values()} == {torch.bfloat16}
    states = ck["optimizer"]["state"].values()
    assert {t.dtype for st in states for k, t in st.items() if k != "step"} == {torch.bfloat16}
    assert all(torch.isfinite(st["exp_avg"]).all() and st["exp_avg"].abs().sum() > 0 for st in states)
    ev = svf.ExpertVector.load(tmp_path / "z.safetensors")  # saved as fp32 (exactly the bf16 values)
    assert all(torch.equal(ev.z[n], ck["best_state"][n].float()) for n in ev.z)
    assert ev.meta["svf_precision"] == "bf16" and ev.meta["training"]["rollout_precision"] == "bf16"
    assert json.loads((tmp_path / "provenance.json").read_text())["svf_precision"] == "bf16"

    # rollouts: the shared HF model holds W′ composed in bf16 from bf16 factors, the base weights after
    cfg = loop.resolve_protocol(_cfg(tiny, svd_path, tmp_path / "x", svf_precision="bf16"))
    learner = SVFLearner(cfg)
    with torch.no_grad():
        for z in learner.z.values():
            z.add_(torch.linspace(-1, 1, z.numel(), dtype=z.dtype))
    backend = learner.make_backend(cfg)
    params = dict(learner.model.named_parameters())
    base = {n: params[n].detach().clone() for n in learner.svd.names}
    scales = learner.policy.scales()
    try:
        with learner.generating(backend):
            for n in learner.svd.names:
                U, S, V = learner.svd.usv(n)
                want = svf.compose(U, S, V, scales[n], params[n].dtype, "bf16")
                assert torch.equal(params[n], want), n
            assert any(not torch.equal(params[n], svf.compose(*learner.svd.usv(n), scales[n], params[n].dtype))
                       for n in learner.svd.names)  # not the fp32 composition
    finally:
        backend.close()
    assert all(torch.equal(params[n], base[n]) for n in base)


def test_nan_guard_keeps_last_good_checkpoint(tiny, svd_path, tmp_path):
    from safetensors.torch import load_file, save_file

    from t2eval.train.reinforce import train_svf

    model_dir = tmp_path / "model"
    shutil.copytree(tiny, model_dir)
    out = tmp_path / "run"
    # ntp: the scored tokens are the references, so a broken forward must show up in the loss
    cfg = _cfg(tiny, svd_path, out, model=str(model_dir), iterations=3, stop_after=1, objective="ntp")
    train_svf(cfg, task=ToyTask())
    ck_bytes = (out / "checkpoints" / "latest.pt").read_bytes()
    z_bytes = (out / "z.safetensors").read_bytes()
    # break a non-SVF weight (the final norm) so the next forward produces NaN
    w = load_file(model_dir / "model.safetensors")
    w["model.norm.weight"] = torch.full_like(w["model.norm.weight"], float("nan"))
    save_file(w, model_dir / "model.safetensors", metadata={"format": "pt"})
    cfg.stop_after = None
    with pytest.raises(T2EvalError, match="loss is NaN/inf at iteration 1.*last good checkpoint"):
        train_svf(cfg, task=ToyTask())
    assert (out / "checkpoints" / "latest.pt").read_bytes() == ck_bytes
    assert (out / "z.safetensors").read_bytes() == z_bytes
    assert len(_rows(out)) == 1


def test_nan_z_stops_before_any_checkpoint(tiny, svd_path, tmp_path):
    from t2eval.train.reinforce import train_svf

    with pytest.raises(T2EvalError, match="z is NaN/inf at iteration 0.*no checkpoint"):
        train_svf(_cfg(tiny, svd_path, tmp_path, lr=float("inf"), iterations=1), task=ToyTask())
    assert not (tmp_path / "checkpoints" / "latest.pt").exists()
    assert not (tmp_path / "z.safetensors").exists()


def test_ntp_objective_lowers_reference_nll(tiny, svd_path, tmp_path, loaded):
    from t2eval import svf
    from t2eval.train import losses
    from t2eval.train.reinforce import train_svf
    from t2eval.train.rollout import encode_completions

    model, tok, svd = loaded
    task = ToyTask()
    docs = task.docs("train")
    p_ids, c_ids = encode_completions(tok, [task.prompt(tok, d) for d in docs], [task.reference(d) for d in docs],
                                      append_eos=True)

    def nll(z):
        return losses.sequence_loss_backward(svf.SVFModule(model, svd, z), p_ids, c_ids, losses.ntp_weights(c_ids),
                                             pad_id=tok.pad_token_id, backward=False)["pg_loss"]

    before = nll(svf.init_z(svd, 1))
    train_svf(_cfg(tiny, svd_path, tmp_path, objective="ntp", iterations=3, batch_size=10, lr=0.05,
                   eval_every=10), task=task)
    ck = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=False)
    assert nll(ck["z"]) < before
    assert _rows(tmp_path)[0]["reward_mean"] is None


def test_cli_end_to_end_arc_easy(tiny, svd_path, tmp_path, data_mirror):
    from t2eval.cli import main

    data = tmp_path / "data"
    assert main(["prepare-data", "--mirror", str(data_mirror), "--out", str(data), "--datasets", "arc_easy"]) == 0
    out = tmp_path / "experts" / "tiny" / "svf" / "arc_easy"
    argv = ["train-svf", "--model", str(tiny), "--svd", str(svd_path), "--task", "arc_easy", "--out", str(out),
            "--iterations", "2", "--batch-size", "2", "--micro-batch", "2", "--max-new-tokens", "4",
            "--eval-every", "1", "--eval-limit", "2", "--kl-coef", "0.1", "--optimizer", "adamw-cosine",
            "--param", "code", "--seed", "0", "--backend", "hf", "--data-dir", str(data), "--no-progress"]
    assert main(argv) == 0
    for f in ("z.safetensors", "log.jsonl", "checkpoints/latest.pt", "provenance.json"):
        assert (out / f).exists(), f
    rows = _rows(out)
    assert [r["iteration"] for r in rows] == [0, 1]
    assert rows[0]["kl"] >= 0 and rows[1]["lr"] < rows[0]["lr"]  # cosine decay
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["stage"] == "train-svf" and prov["config"]["optimizer"] == "adamw-cosine"
    from t2eval.svf import ExpertVector

    ev = ExpertVector.load(out / "z.safetensors")
    assert ev.meta["task"] == "arc_easy" and ev.param == "code"
    # finished: a rerun resumes at the end and changes nothing
    before = (out / "log.jsonl").read_bytes()
    assert main(argv) == 0
    assert (out / "log.jsonl").read_bytes() == before
    # a user error is a clean exit 2
    assert main(argv[:-1] + ["--no-progress", "--micro-batch", "0"]) == 2


@pytest.mark.parametrize("module,cls", [("svf_cli", "SVFTrainConfig"), ("lora_cli", "LoRATrainConfig")])
def test_cli_options_are_the_config_fields(module, cls):
    """The CLI is generated from the stage config: defaults round-trip, and rendered values parse back."""
    import argparse
    import importlib

    from t2eval import stage_config
    from t2eval.train import configs

    Cfg = getattr(configs, cls)
    p = argparse.ArgumentParser()
    importlib.import_module(f"t2eval.train.{module}").add_arguments(p)
    req = dict(model="m", task="gsm8k", out="o", **({"svd": "s"} if cls == "SVFTrainConfig" else {}))
    assert stage_config.from_args(Cfg, p.parse_args(stage_config.argv(req, Cfg))) == Cfg(**req)
    changed = Cfg(**req, iterations=3, eval_splits=("valid", "test"), max_new_tokens=None, eval_limit=5,
                  progress=False, threads=1, lr=0.25)
    argv = stage_config.argv(changed, Cfg)
    assert "--no-progress" in argv and argv[argv.index("--eval-splits") + 1] == "valid,test"
    assert stage_config.from_args(Cfg, p.parse_args(argv)) == changed
