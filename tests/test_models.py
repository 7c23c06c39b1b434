"""Models: the embedded SmolLM2 build, the tiny test model, registry resolution and hub errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from t2eval.config import guess_family, model_registry, model_spec
from t2eval.errors import MissingModelError, T2EvalError
from t2eval.models.loading import resolve_model_dir
from t2eval.tasks import get_task


def _logits(model, tok, text="<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"):
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.slow
def test_smollm2_build_fp32_equals_gguf(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from t2eval.models.embedded import load_gguf

    built = AutoModelForCausalLM.from_pretrained(smollm2_dir)  # plain HF load, no gguf_file
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert built.dtype == torch.float32
    assert getattr(built.config, "quantization_config", None) is None
    ref, ref_tok = load_gguf("float32")
    assert tok.chat_template and tok.chat_template == ref_tok.chat_template
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == ref_tok.apply_chat_template(msgs, tokenize=False)
    assert torch.equal(_logits(built, tok), _logits(ref, ref_tok))  # bit-identical


@pytest.mark.slow
def test_smollm2_build_bf16(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from t2eval.models.embedded import build_smollm2, load_gguf

    out = build_smollm2(tmp_path / "smol-bf16", dtype="bfloat16")
    built = AutoModelForCausalLM.from_pretrained(out)
    assert built.dtype == torch.bfloat16
    ref, _ = load_gguf("float32")
    tok = AutoTokenizer.from_pretrained(out)
    sd_ref = ref.state_dict()
    for name, p in built.state_dict().items():  # stored weights are the fp32 values rounded to bf16
        assert torch.equal(p, sd_ref[name].to(torch.bfloat16)), name
    a, b = _logits(built, tok).float(), _logits(ref, tok)
    assert torch.argmax(a[0, -1]) == torch.argmax(b[0, -1])
    assert (a - b).abs().max() / b.abs().max() < 0.05
    assert json.loads((out / "t2eval_model.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "provenance.json").read_text())["config"]["dtype"] == "bfloat16"


def test_tiny_model_is_deterministic(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from t2eval.models.tiny import build_tiny_llama

    a = build_tiny_llama(tmp_path / "a", seed=3)
    b = build_tiny_llama(tmp_path / "b", seed=3)
    c = build_tiny_llama(tmp_path / "c", seed=4)
    sa, sb, sc = (load_file(d / "model.safetensors") for d in (a, b, c))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].ndim == 2)
    m = AutoModelForCausalLM.from_pretrained(a)
    assert m.config.num_hidden_layers == 2 and m.config.hidden_size == 64
    tok = AutoTokenizer.from_pretrained(a)
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    out = m.generate(**tok("hello", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 1


def test_registry_has_the_protocol_models():
    reg = model_registry()
    assert reg["smollm2-135m"].source == "embedded"
    arc = get_task("arc_easy")  # PROTOCOL §5: only Llama-3 gets the ARC pre-fill, by its registry family
    assert reg["llama3-8b"].hub_id == "meta-llama/Meta-Llama-3-8B-Instruct" and arc.prefill({}, reg["llama3-8b"].family)
    assert reg["mistral-7b"].hub_id == "mistralai/Mistral-7B-Instruct-v0.3" and not arc.prefill({}, reg["mistral-7b"].family)
    assert reg["llama3-70b"].svf_layers == "half"


def test_local_dir_resolves(tiny_model, tmp_path):
    assert resolve_model_dir(str(tiny_model)) == tiny_model
    assert model_spec(str(tiny_model)).key == "tiny-llama"  # a prepared dir records its registry key
    import shutil

    own = tmp_path / "my-llama-3-finetune"
    own.mkdir()
    shutil.copy(tiny_model / "config.json", own / "config.json")
    spec = model_spec(str(own))  # any other HF dir: a local model, family guessed from its name
    assert spec.source == "local" and spec.family == "llama3" and get_task("arc_easy").prefill({}, spec.family)
    for name, family in (("Mistral-7B-v0.3-mine", "mistral"), ("SmolLM2-360M", "smollm2")):
        assert guess_family(name) == family
    assert guess_family("gpt2-finetune") is None


def test_unknown_model_error(tmp_path):
    with pytest.raises(MissingModelError, match="unknown model"):
        resolve_model_dir("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingModelError, match="no config.json"):
        resolve_model_dir(str(tmp_path / "empty"))


def test_embedded_model_not_built_error(tmp_path):
    with pytest.raises(MissingModelError, match="t2eval prepare-model smollm2-135m"):
        resolve_model_dir("smollm2-135m", models_dir=tmp_path)


def test_unreachable_hub_model_gives_clear_error(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "t2eval.cli", "prepare-model", "llama3-8b", "--out", str(tmp_path / "m")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "meta-llama/Meta-Llama-3-8B-Instruct" in r.stderr
    assert "not in the local Hugging Face cache" in r.stderr and "hub could not be reached" in r.stderr
    assert "local" in r.stderr and "path" in r.stderr


def test_cli_help_lists_subcommands():
    r = subprocess.run([sys.executable, "-m", "t2eval.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for cmd in ("prepare-model", "prepare-data"):
        assert cmd in r.stdout


def test_bad_dtype_error():
    from t2eval.models.loading import torch_dtype

    with pytest.raises(T2EvalError, match="unknown dtype"):
        torch_dtype("float7")
