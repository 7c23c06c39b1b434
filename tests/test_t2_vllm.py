"""The lm-eval model `t2` with backend=vllm (lm-eval's VLLM + SVF swaps inside the vLLM workers),
checked through lm-eval against backend=hf on SmolLM2-135M-Instruct (fp32, greedy):

1. adapter=none: `t2_arc_challenge` generations (simple_evaluate) and loglikelihoods agree with HF;
2. Transformer² two-pass (strategy=prompt, dispatch=generate and logprob): timing records, one
   dispatch row per document, answers in the original order; constant-z experts (W' == W) give the
   base answers; an interleaved second pass equals answering each request alone under its expert;
   the base weights are back afterwards;
3. adapter=lora:PATH: vLLM's LoRARequest agrees with HF + peft and changes the base outputs.

Engines (~30 s each to start on 2 CPU cores): one `t2` instance for the module, built like
`lm_eval --model t2 --model_args backend=vllm,strategy=prompt,...` would build it; the tests switch
its t2 settings with `_t2_setup` (what its constructor ends with: the engine is the same for every
strategy once it has the SVF worker extension). LoRA gets a second, short-lived engine: lm-eval's
VLLM attaches its LoRARequest to every request of the instance. The HF references are computed
first and the HF models dropped, so HF and vLLM never compete for the cores.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from t2eval.errors import T2EvalError

pytest.importorskip("vllm", reason="vllm is not importable")  # skip only when vLLM can't import

TASK = "t2_arc_challenge"
LIMIT = 8  # one batch of 8 on both sides
MAX_GEN = 32
LORA_GEN = 16  # vLLM's CPU LoRA kernels are slow: shorter answers for the LoRA comparison
LETTERS = "ABCD"
ENGINE = {"max_model_len": 2048, "kv_cache_memory_bytes": 2**30}

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def _cache_dir() -> Path:
    d = Path(os.environ.get("T2EVAL_TEST_CACHE", tempfile.gettempdir())) / "t2eval-test-models"
    d.mkdir(parents=True, exist_ok=True)
    return d


# --------------------------------------------------------------------------- inputs

@pytest.fixture(scope="module")
def task_manager(data_mirror, tmp_path_factory):
    from lm_eval.tasks import TaskManager

    from t2eval.cli import main
    from t2eval.tasks import lm_eval_task_dir

    d = tmp_path_factory.mktemp("data")
    assert main(["prepare-data", "--mirror", str(data_mirror), "--out", str(d), "--datasets", "arc_challenge"]) == 0
    mp = pytest.MonkeyPatch()
    mp.setenv("T2EVAL_DATA_DIR", str(d))
    yield TaskManager(include_path=str(lm_eval_task_dir()), include_defaults=False)
    mp.undo()


@pytest.fixture(scope="module")
def svd_cache(smollm2_dir):
    from t2eval.svd import ensure_svd

    tag = hashlib.sha256(str(smollm2_dir.resolve()).encode()).hexdigest()[:8]
    return ensure_svd(smollm2_dir, "mlp", out=_cache_dir() / f"smollm2-135m-mlp-{tag}.safetensors")


@pytest.fixture(scope="module")
def experts(svd_cache, tmp_path_factory) -> dict[str, dict[str, str]]:
    """const: z = 0.5 everywhere (the code parameterisation then gives W' == W); random: mild
    random z per expert (coherent text, but different from the base and from each other)."""
    from t2eval.svf import ExpertVector

    root = tmp_path_factory.mktemp("experts")
    out: dict[str, dict[str, str]] = {"const": {}, "random": {}}
    for i, name in enumerate(("math", "code", "reasoning")):
        g = torch.Generator().manual_seed(10 + i)
        for kind in out:
            z = {n: (torch.full((svd_cache.rank(n),), 0.5) if kind == "const"
                     else 0.1 + 0.3 * torch.randn(svd_cache.rank(n), generator=g)) for n in svd_cache.names}
            p = root / kind / name / "z.safetensors"
            ExpertVector.from_svd(z, svd_cache, param="code", task=name).save(p)
            out[kind][name] = str(p.parent)
    return out


@pytest.fixture(scope="module")
def lora_dir(smollm2_dir, tmp_path_factory) -> Path:
    """A peft LoRA adapter (r=16 on q_proj, v_proj) with non-zero B, so it changes the outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    out = tmp_path_factory.mktemp("lora") / "adapter"
    peft.save_pretrained(out)
    del peft, model
    return out


@pytest.fixture(scope="module")
def chat_template(smollm2_dir) -> str:
    """The model's own template, passed as chat_template_args (how evaluate.py passes the code tasks')."""
    return (smollm2_dir / "chat_template.jinja").read_text()


# --------------------------------------------------------------------------- helpers

def _evaluate(lm, tm, max_gen: int = MAX_GEN) -> tuple[list[str], list[dict]]:
    import lm_eval

    res = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=tm, limit=LIMIT, apply_chat_template=True,
                                  log_samples=True, gen_kwargs=f"max_gen_toks={max_gen}")
    samples = sorted(res["samples"][TASK], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(LIMIT))
    return [s["resps"][0][0] for s in samples], samples


def _context(sample) -> str:
    a = sample["arguments"]
    return a["gen_args_0"]["arg_0"] if isinstance(a, dict) else a[0][0]


def _ll_instances(contexts):
    from lm_eval.api.instance import Instance

    pairs = [(c, f"The answer is ({x})") for c in contexts[:3] for x in LETTERS]
    return [Instance("loglikelihood", {}, p, i, (TASK, i // len(LETTERS), 1)) for i, p in enumerate(pairs)]


def _gen_instances(contexts, max_gen=16):
    from lm_eval.api.instance import Instance

    gk = {"until": ["Instruction:", "Response:"], "max_gen_toks": max_gen, "do_sample": False}
    return [Instance("generate_until", {}, (c, dict(gk)), i, ("toy", i, 1)) for i, c in enumerate(contexts)]


def _cls_prompts(tokenizer) -> list[str]:
    from t2eval.adapt import dispatch as dsp

    questions = ["What is 12 + 7?", "Write a Python function that reverses a string.",
                 "Why does ice float on water?", "Name a primary color."]
    return [dsp.classification_prompt(tokenizer, q) + dsp.ANSWER_PREFIX for q in questions]


def _truncated(text: str, tokenizer, n: int) -> str:
    """The first n tokens of a greedy answer: what a run with max_gen_toks=n would have produced."""
    return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:n])


def _agree(a, b) -> float:
    assert len(a) == len(b)
    return sum(x == y for x, y in zip(a, b)) / len(a)


def _close(lm) -> None:
    from t2eval.backends import vllm as vb

    llm = getattr(lm, "model", None)
    if llm is not None:
        vb._DRIVER.pop(id(llm), None)
        llm.llm_engine.engine_core.shutdown()
    gc.collect()


@contextmanager
def _configured(lm, **t2):
    """Switch the instance's t2 settings (as its constructor would have set them), then back to base."""
    from t2eval.lm import T2Config

    lm._t2_set_scales(None)
    lm._t2_setup(T2Config.from_kwargs(dict(t2)))
    try:
        yield lm
    finally:
        lm._t2_set_scales(None)
        lm._t2_setup(T2Config.from_kwargs({"svd": t2.get("svd")}))


def _experts_args(paths: dict[str, str]) -> dict[str, str]:
    return {f"expert_{n}": p for n, p in paths.items()}


# --------------------------------------------------------------------------- references and engine

@pytest.fixture(scope="module")
def hf_ref(smollm2_dir, task_manager, lora_dir, chat_template):
    from t2eval.lm import T2LM

    ref = {}
    lm = T2LM(pretrained=str(smollm2_dir), batch_size=8, chat_template_args={"chat_template": chat_template})
    ref["base"], samples = _evaluate(lm, task_manager)
    ref["contexts"] = [_context(s) for s in samples]
    ref["ll"] = lm.loglikelihood(_ll_instances(ref["contexts"]), disable_tqdm=True)
    ref["cls_prompts"] = _cls_prompts(lm.tokenizer)
    with torch.no_grad():  # each prompt alone (no padding): the plain reference for the next-token rows
        ref["next"] = [lm.model(torch.tensor([lm.tokenizer(p, add_special_tokens=False)["input_ids"]]))
                       .logits[0, -1].log_softmax(-1) for p in ref["cls_prompts"]]
    del lm
    lm = T2LM(pretrained=str(smollm2_dir), adapter=f"lora:{lora_dir}", batch_size=8)
    ref["lora"], _ = _evaluate(lm, task_manager, LORA_GEN)
    del lm
    gc.collect()
    return ref


@pytest.fixture(scope="module")
def vlm(smollm2_dir, svd_cache, experts, hf_ref, chat_template):
    """The module's vLLM-backed `t2`, built through evaluate.build_lm; left on strategy=none + svd."""
    from t2eval.evaluate import build_lm
    from t2eval.lm import T2Config

    args = {"backend": "vllm", "strategy": "prompt", "svd": svd_cache.path, "dispatch": "generate",
            "cls_max_new_tokens": 16, "chat_template_args": {"chat_template": chat_template},
            **_experts_args(experts["const"]), **ENGINE}
    lm = build_lm(str(smollm2_dir), args, batch_size=8, device="cpu")
    assert lm.t2.strategy == "prompt" and lm.hf_chat_template == chat_template
    lm._t2_setup(T2Config.from_kwargs({"svd": svd_cache.path}))
    yield lm
    _close(lm)


@pytest.fixture(scope="module")
def vllm_base(vlm, task_manager, hf_ref):
    outs, samples = _evaluate(vlm, task_manager)
    assert [_context(s) for s in samples] == hf_ref["contexts"]  # same prompts, same template
    return outs


# --------------------------------------------------------------------------- 1. adapter=none

def test_base_generate_and_loglikelihood_match_hf(vlm, vllm_base, hf_ref):
    assert vlm.t2.strategy == "none" and vlm.t2.adapter == "none"
    assert all(vllm_base) and len(set(vllm_base)) > 1
    assert _agree(vllm_base, hf_ref["base"]) >= 0.95, list(zip(vllm_base, hf_ref["base"]))
    got = vlm.loglikelihood(_ll_instances(hf_ref["contexts"]), disable_tqdm=True)
    for (lp, greedy), (want, want_greedy) in zip(got, hf_ref["ll"], strict=True):
        assert lp == pytest.approx(want, abs=2e-3)
        assert greedy == want_greedy
    assert len({round(lp, 3) for lp, _ in got}) > 1
    rec = vlm.t2_records[TASK]
    assert rec["second_pass_s"] > 0 and rec["first_pass_s"] is None and rec["tokens_second"] > 0


def test_next_token_logprobs_match_hf(vlm, hf_ref):
    """dispatch=logprob's one-pass path on vLLM (full next-token rows) against a plain HF forward."""
    from t2eval.adapt import dispatch as dsp

    rows = vlm._t2_next_token_logprobs(hf_ref["cls_prompts"])
    firsts = dsp.label_first_tokens(vlm.tokenizer, hf_ref["cls_prompts"][0], dsp.categories())
    assert firsts is not None
    for row, want in zip(rows, hf_ref["next"], strict=True):
        assert row.shape == want.shape and torch.isfinite(row).all()
        assert int(row.argmax()) == int(want.argmax())
        top = want.topk(20).indices.tolist() + firsts
        assert row[top].tolist() == pytest.approx(want[top].tolist(), abs=2e-3)


# --------------------------------------------------------------------------- 2. SVF two-pass

@pytest.mark.parametrize("mode", ["generate", "logprob"])
def test_two_pass_constant_experts_give_base_outputs(vlm, vllm_base, task_manager, svd_cache, experts, mode):
    with _configured(vlm, strategy="prompt", svd=svd_cache.path, dispatch=mode, cls_max_new_tokens=16,
                     **_experts_args(experts["const"])):
        outs, _ = _evaluate(vlm, task_manager)
        rec = vlm.t2_records[TASK]
    assert outs == vllm_base, [(i, a, b) for i, (a, b) in enumerate(zip(outs, vllm_base)) if a != b]
    assert rec["strategy"] == "prompt" and rec["dispatch_mode"] == mode
    for k in ("first_pass_s", "second_pass_s", "tokens_first", "tokens_second", "prompt_tokens_first"):
        assert rec[k] > 0, k
    assert [d["doc_id"] for d in rec["dispatch"]] == list(range(LIMIT))  # one dispatch per document
    chosen = [d["chosen"] for d in rec["dispatch"]]
    assert set(chosen) <= {"math", "code", "reasoning", "other"}
    assert sum(rec["groups"].values()) == LIMIT and set(rec["groups"]) == set(chosen)
    assert rec["swap_s"] > 0
    if set(chosen) - {"other"}:  # an expert was loaded: a real reload, not just the no-op restore
        assert rec["swap_s"] > 0.01
    state = vlm.model.collective_rpc("t2_svf_state")[0]  # None: no expert was ever loaded
    assert state is None or state["patched"] == 0  # base weights in the workers
    print(f"dispatch={mode}: chosen {chosen}; first {rec['first_pass_s']:.2f}s, second {rec['second_pass_s']:.2f}s, "
          f"swap {rec['swap_s']:.2f}s")


def test_second_pass_interleaved_groups_keep_order(vlm, hf_ref, svd_cache, experts):
    """Documents dispatched to interleaved experts come back in request order, each answered with
    its own expert: equal to answering every request alone under that expert."""
    reqs = _gen_instances(hf_ref["contexts"][:4])
    chosen = {0: "math", 1: "other", 2: "code", 3: "math"}
    # "other" = base weights is the corrected protocol's rule (release: the last expert loaded; tested on HF in
    # test_release_dispatch.py)
    with _configured(vlm, strategy="prompt", svd=svd_cache.path, protocol="corrected",
                     **_experts_args(experts["random"])):
        rec = vlm._t2_record("toy")
        out = vlm._t2_second_pass("generate_until", reqs, chosen, True, rec)
        alone = []
        for r in reqs:
            e = chosen[r.doc_id]
            vlm._t2_set_scales(vlm.t2_bank.scales(experts["random"][e]) if e != "other" else None)
            alone.append(vlm._t2_base.generate_until([r], disable_tqdm=True)[0])
        vlm._t2_set_scales(None)
        base = vlm._t2_base.generate_until(reqs, disable_tqdm=True)
    assert rec["groups"] == {"math": 2, "other": 1, "code": 1}
    assert rec["second_pass_s"] > 0 and rec["swap_s"] > 0.01
    assert out == alone
    assert out[1] == base[1]  # "other" = base weights
    assert sum(o != b for o, b in zip(out, base)) >= 2, "the random experts should change most answers"


def test_base_weights_restored_after_two_pass(vlm, vllm_base, task_manager, smollm2_dir, tmp_path):
    """Runs after the two-pass tests: the same instance on strategy=none answers exactly as before
    (through `t2eval evaluate`'s function, which writes the cell and lm-eval's samples)."""
    from t2eval.evaluate import evaluate

    assert vlm.t2.strategy == "none"
    out = tmp_path / "raw" / "arc_challenge.json"
    cell = evaluate(str(smollm2_dir), "base", "arc_challenge", out, {"backend": "vllm"}, lm=vlm, limit=LIMIT,
                    lm_eval_task=TASK, gen_kwargs=f"max_gen_toks={MAX_GEN}")
    lines = (out.with_name("arc_challenge.lm_eval") / "samples.jsonl").read_text().splitlines()
    samples = sorted((json.loads(x) for x in lines), key=lambda x: x["doc_id"])
    assert [x["resps"][0][0] for x in samples] == vllm_base
    assert cell["total"] == LIMIT and cell["timing"]["second_pass_s"] > 0
    assert cell["timing"]["hardware"].endswith("backend=vllm")


# --------------------------------------------------------------------------- 3. LoRA

def test_lora_adapter_matches_hf_peft(smollm2_dir, lora_dir, hf_ref, vllm_base, task_manager):
    from t2eval.evaluate import build_lm

    lm = build_lm(str(smollm2_dir), {"backend": "vllm", "adapter": f"lora:{lora_dir}", **ENGINE}, batch_size=8)
    try:
        assert lm.lora_request is not None and lm.model.llm_engine.vllm_config.lora_config.max_lora_rank >= 16
        outs, _ = _evaluate(lm, task_manager, LORA_GEN)
        rec = lm.t2_records[TASK]
    finally:
        _close(lm)
    base = [_truncated(b, lm.tokenizer, LORA_GEN) for b in vllm_base]
    print(f"LoRA: {_agree(outs, hf_ref['lora']):.0%} equal to HF+peft, {1 - _agree(outs, base):.0%} differ "
          f"from the base")
    assert {d["chosen"] for d in rec["dispatch"]} == {"lora"}
    assert _agree(outs, hf_ref["lora"]) >= 0.95, list(zip(outs, hf_ref["lora"]))
    assert any(a != b for a, b in zip(outs, base)), "the adapter should change some outputs"
    assert any(a != b for a, b in zip(hf_ref["lora"], base))


# --------------------------------------------------------------------------- fail before the engine starts

def test_bad_model_args_fail_before_engine_start(smollm2_dir, experts, tmp_path):
    from t2eval.lm import T2LM

    with pytest.raises(T2EvalError, match="adapter_config.json"):
        T2LM(pretrained=str(smollm2_dir), backend="vllm", adapter=f"lora:{tmp_path}")
    with pytest.raises(T2EvalError, match="svd="):
        T2LM(pretrained=str(smollm2_dir), backend="vllm", strategy="prompt", **_experts_args(experts["const"]))
    with pytest.raises(T2EvalError, match="svd="):
        T2LM(pretrained=str(smollm2_dir), backend="vllm", adapter=f"svf:{experts['const']['math']}")
