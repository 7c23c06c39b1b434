"""LoRA baseline on the tiny model: masking, one step, save/load, resume, pg variant, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from t2eval.testing import tiny_model_dir

from test_reinforce import ToyTask  # the same toy task (chat prompts, text-sensitive scorer)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_dir(0)


def _cfg(tiny, out, **kw):
    from t2eval.train.lora import LoRATrainConfig

    base = dict(model=str(tiny), task="toy", out=str(out), iterations=3, batch_size=4, micro_batch=2,
                max_new_tokens=4, eval_every=1, lr=5e-3, seed=1, progress=False)
    base.update(kw)
    return LoRATrainConfig(**base)


def _rows(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_prompt_tokens_are_masked_and_loss_matches_hf_labels(tiny):
    from t2eval.models.loading import load_model, load_tokenizer
    from t2eval.train import losses
    from t2eval.train.lora import lm_labels
    from t2eval.train.rollout import encode_completions

    model, tok = load_model(str(tiny)), load_tokenizer(str(tiny))
    task = ToyTask()
    docs = task.docs("train")[:3]
    p_ids, c_ids = encode_completions(tok, [task.prompt(tok, d) for d in docs], [task.reference(d) for d in docs],
                                      append_eos=True)
    ids, mask, labels = lm_labels(p_ids, c_ids, tok.pad_token_id)
    n_prompt = [len(p) for p in p_ids]
    for i in range(3):  # every prompt and pad position is -100, every completion token is a label
        row = labels[i].tolist()
        assert row.count(-100) == ids.shape[1] - len(c_ids[i])
        assert row[-len(c_ids[i]):] == c_ids[i]
        assert n_prompt[i] > 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        hf = model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels).loss
    ours = losses.sequence_loss_backward(model, p_ids, c_ids, losses.ntp_weights(c_ids), pad_id=tok.pad_token_id,
                                         micro_batch=2, backward=False)["pg_loss"]
    assert ours == pytest.approx(float(hf), rel=1e-5)


def test_one_step_changes_adapter_and_save_load_round_trip(tiny, tmp_path):
    from t2eval.train.lora import load_adapter, lora_model, save_adapter, trainable_state
    from t2eval.models.loading import load_model

    model = lora_model(load_model(str(tiny)), targets="attn", seed=0)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(("q_proj" in n or "v_proj" in n) and "lora_" in n for n in names)
    before = trainable_state(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    after = trainable_state(model)
    assert any(not torch.equal(before[n], after[n]) for n in names if "lora_B" in n)
    save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert not any(p.name.startswith(".adapter.") for p in (tmp_path / "adapter").iterdir())
    loaded = load_adapter(str(tiny), str(tmp_path / "adapter"))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-6)
    base = load_model(str(tiny))
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, b, atol=1e-6)


def test_mlp_attn_targets(tiny):
    from t2eval.models.loading import load_model
    from t2eval.train.lora import lora_model

    model = lora_model(load_model(str(tiny)), targets="mlp+attn")
    mods = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert mods == {"q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    from t2eval.train.lora import train_lora

    out = tmp_path_factory.mktemp("lora")
    return out, train_lora(_cfg(tiny, out), task=ToyTask())


def test_train_writes_adapter_log_checkpoint(full_run):
    out, summary = full_run
    assert summary["finished"]
    for f in ("adapter_config.json", "adapter_model.safetensors", "log.jsonl", "checkpoints/latest.pt",
              "provenance.json"):
        assert (out / f).exists(), f
    rows = _rows(out)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert all("split_scores" in r and "valid" in r["split_scores"] and "best" in r for r in rows)
    assert all(r["ntp_loss"] > 0 for r in rows)
    assert rows[-1]["ntp_loss"] < rows[0]["ntp_loss"]  # lr 5e-3 on 8 fixed references: the NLL drops


def test_resume_gives_identical_adapter(full_run, tiny, tmp_path):
    from t2eval.train.lora import train_lora

    out_full, _ = full_run
    cfg = _cfg(tiny, tmp_path, stop_after=1)
    train_lora(cfg, task=ToyTask())
    cfg.stop_after = None
    train_lora(cfg, task=ToyTask())
    a = torch.load(out_full / "checkpoints" / "latest.pt", weights_only=False)["adapter"]
    b = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=False)["adapter"]
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert (out_full / "adapter_model.safetensors").read_bytes() == (tmp_path / "adapter_model.safetensors").read_bytes()


def test_pg_objective_and_cli(tiny, tmp_path, data_mirror):
    from t2eval.cli import main
    from t2eval.train.lora import train_lora

    out = tmp_path / "pg"
    train_lora(_cfg(tiny, out, objective="pg", iterations=1), task=ToyTask())
    row = _rows(out)[0]
    assert row["reward_mean"] is not None and row["pg_loss"] is not None and row["ntp_loss"] is None

    data = tmp_path / "data"
    assert main(["prepare-data", "--mirror", str(data_mirror), "--out", str(data), "--datasets", "arc_easy"]) == 0
    cli_out = tmp_path / "experts" / "tiny" / "lora" / "arc_easy"
    assert main(["train-lora", "--model", str(tiny), "--task", "arc_easy", "--out", str(cli_out), "--iterations", "1",
                 "--batch-size", "2", "--micro-batch", "2", "--max-new-tokens", "4", "--eval-limit", "2",
                 "--data-dir", str(data), "--no-progress"]) == 0
    assert (cli_out / "adapter_model.safetensors").exists() and len(_rows(cli_out)) == 1
