"""`t2eval fit-fewshot` under the two protocols on the tiny model (PROTOCOL §6.3, §8; issues 8.7, 13.3):
release selects α on the reported set every 10 iterations, corrected keeps the final incumbent; both
are recorded in alpha.json; the search state is tied to its inputs (a retrained expert restarts it);
the experts and the SVD cache are checked against the model they patch (`ExpertBank.check_model`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from t2eval.adapt.cem import FORCED_LABEL
from t2eval.errors import T2EvalError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RELEASE_LABEL = "α selected on the reported set"
CORRECTED_LABEL = "α selected on the shots only (final incumbent)"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch

    from t2eval.backends.hf import HFBackend
    from t2eval.svd import decompose, load_svd
    from t2eval.svf import ExpertVector
    from t2eval.testing import tiny_model_dir

    tiny = str(tiny_model_dir(0))
    root = tmp_path_factory.mktemp("fewshot_protocol")
    svd_path = root / "svd.safetensors"
    decompose(tiny, "mlp", out=svd_path)
    svd = load_svd(svd_path)
    experts = {}
    for i, name in enumerate(["math", "code", "reasoning"]):
        g = torch.Generator().manual_seed(21 + i)
        z = {n: 2.0 * torch.randn(svd.rank(n), generator=g) for n in svd.names}
        ExpertVector.from_svd(z, svd, param="code", task=name).save(root / "experts" / name / "z.safetensors")
        experts[name] = str(root / "experts" / name)
    be = HFBackend(tiny, svd=svd, batch_size=10)
    return tiny, str(svd_path), experts, root, be


def _spec(experts):
    return ",".join(f"{n}:{p}" for n, p in experts.items())


def _log(out):
    return [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_release_selects_on_the_reported_set_corrected_on_the_shots(setup, data_mirror, monkeypatch):
    from t2eval.adapt.fewshot_cli import fit_fewshot
    from t2eval.tasks import get_task

    tiny, svd, experts, root, be = setup
    task = get_task("arc_challenge")
    shots = task.docs("fewshot_heldout", data_mirror)
    reported_all = task.docs("fewshot_test", data_mirror)
    # 11 iterations: the release checks the incumbent on the reported set after iterations 1 and 11
    kw = dict(iterations=11, population=4, seed=5, backend=be, max_new_tokens=2, docs=shots, data_dir=data_mirror,
              reported_limit=3)
    before = os.environ.get("T2EVAL_PROTOCOL")
    rel = fit_fewshot(tiny, svd, _spec(experts), "arc_challenge", root / "release", protocol="release", **kw)
    cor = fit_fewshot(tiny, svd, _spec(experts), "arc_challenge", root / "corrected", protocol="corrected", **kw)
    assert os.environ.get("T2EVAL_PROTOCOL") == before  # the caller's protocol is put back

    saved_r = json.loads((root / "release" / "alpha.json").read_text())
    saved_c = json.loads((root / "corrected" / "alpha.json").read_text())
    assert saved_r == rel and saved_c == cor
    # what is recorded: the rule, its label, the iteration chosen, the reported score, mixing and precision
    assert (rel["select"], rel["alpha_selection"], rel["protocol"]["name"]) == ("reported_set", RELEASE_LABEL, "release")
    assert (cor["select"], cor["alpha_selection"], cor["protocol"]["name"]) == (
        "final_incumbent", CORRECTED_LABEL, "corrected")
    assert rel["protocol"]["knobs"]["fewshot_select"] == "reported_set"
    assert rel["mix_space"] == cor["mix_space"] == "raw_z" and rel["svf_precision"] == "fp32"
    assert [c["iteration"] for c in rel["reported_checks"]] == [1, 11] and rel["n_reported"] == 3
    assert all(0.0 <= c["reported_score"] <= 1.0 for c in rel["reported_checks"])
    assert rel["reported_score"] == max(c["reported_score"] for c in rel["reported_checks"])
    first_best = next(c for c in rel["reported_checks"] if c["reported_score"] == rel["reported_score"])
    assert rel["selected_iteration"] == first_best["iteration"]  # ties keep the earlier check
    # the reported set is the evaluation's: the first `limit` documents of fewshot_test
    assert rel["provenance"]["reported_doc_ids"] == [d["doc_id"] for d in reported_all[:3]]
    assert not {d["doc_id"] for d in shots} & {d["doc_id"] for d in reported_all}
    assert cor["reported_score"] is None and cor["n_reported"] is None and cor["reported_checks"] == []
    assert cor["selected_iteration"] == 11 and cor["provenance"]["reported_doc_ids"] is None

    log_r, log_c = _log(root / "release"), _log(root / "corrected")
    assert len(log_r) == len(log_c) == 11
    np.testing.assert_array_equal(cor["alpha"], log_c[-1]["best_alpha"])
    np.testing.assert_array_equal(rel["alpha"], log_r[rel["selected_iteration"] - 1]["best_alpha"])
    assert cor["best_score"] == log_c[-1]["best_score"]
    assert rel["best_score"] == log_r[rel["selected_iteration"] - 1]["best_score"]

    # the release's knobs with only the selection rule overridden ($T2EVAL_PROTOCOL_OVERRIDES, the
    # workflow's protocol_overrides): the same search, the same incumbents; only the final choice differs
    monkeypatch.setenv("T2EVAL_PROTOCOL_OVERRIDES", json.dumps({"fewshot_select": "final_incumbent"}))
    ovr = fit_fewshot(tiny, svd, _spec(experts), "arc_challenge", root / "override", protocol="release", **kw)
    log_o = _log(root / "override")
    assert ovr["select"] == "final_incumbent" and ovr["protocol"]["overrides"] == {"fewshot_select": "final_incumbent"}
    assert [r["best_alpha"] for r in log_o] == [r["best_alpha"] for r in log_r]
    np.testing.assert_array_equal(ovr["alpha"], log_r[-1]["best_alpha"])
    assert rel["selected_iteration"] == 1 and rel["alpha"] != ovr["alpha"]  # here the two rules part ways


def test_protocol_from_the_environment_and_the_cli(setup, data_mirror, monkeypatch, capsys):
    from t2eval.cli import main

    tiny, svd, experts, root, _ = setup
    argv = ["fit-fewshot", "--model", tiny, "--svd", svd, "--experts", _spec(experts), "--task", "arc_challenge",
            "--data-dir", str(data_mirror), "--iterations", "1", "--population", "2", "--max-new-tokens", "2",
            "--batch-size", "10"]
    monkeypatch.setenv("T2EVAL_PROTOCOL", "corrected")
    assert main([*argv, "--out", str(root / "env")]) == 0
    assert json.loads((root / "env" / "alpha.json").read_text())["select"] == "final_incumbent"
    assert main([*argv, "--out", str(root / "flag"), "--protocol", "release"]) == 0
    flag = json.loads((root / "flag" / "alpha.json").read_text())
    # one check (iterations <= 10) forces the choice: the reported set is not needed, not scored, and
    # the label does not claim a selection on it
    assert flag["select"] == "reported_set" and flag["alpha_selection"] == FORCED_LABEL
    assert flag["selected_iteration"] == 1 and flag["reported_score"] is None and flag["n_reported"] is None
    assert FORCED_LABEL in capsys.readouterr().out
    monkeypatch.delenv("T2EVAL_PROTOCOL")
    assert main([*argv, "--out", str(root / "bad"), "--reported-limit", "0"]) == 2
    assert "--reported-limit" in capsys.readouterr().err


def test_a_retrained_expert_restarts_the_search(setup, data_mirror, tmp_path):
    import torch

    from t2eval.adapt.fewshot_cli import fit_fewshot
    from t2eval.svd import load_svd
    from t2eval.svf import ExpertVector
    from t2eval.tasks import get_task

    tiny, svd, experts, root, be = setup
    ex = {n: str(tmp_path / "experts" / n) for n in experts}
    for n, p in experts.items():
        shutil.copytree(p, ex[n])
    shots = get_task("arc_challenge").docs("fewshot_heldout", data_mirror)
    kw = dict(iterations=3, population=4, seed=2, backend=be, max_new_tokens=2, docs=shots, per="matrix",
              protocol="corrected")
    out = tmp_path / "fit"
    part = fit_fewshot(tiny, svd, _spec(ex), "arc_challenge", out, stop_after=2, **kw)
    assert part["iterations_done"] == 2 and not (out / "alpha.json").exists()
    old_identity = json.loads((out / "state.json").read_text())["identity"]

    # retrain (re-save) the code expert: the half-done search must not continue with the new experts
    e = ExpertVector.load(Path(ex["code"]) / "z.safetensors")
    g = torch.Generator().manual_seed(99)
    ExpertVector.from_svd({n: -2.0 * torch.randn(v.shape, generator=g) for n, v in e.z.items()}, load_svd(svd),
                          task="code").save(Path(ex["code"]) / "z.safetensors")
    res = fit_fewshot(tiny, svd, _spec(ex), "arc_challenge", out, **kw)
    assert "experts" in res["provenance"]["restarted"]
    assert [r["iteration"] for r in _log(out)] == [1, 2, 3]  # a fresh log, three iterations of this call
    new_identity = json.loads((out / "state.json").read_text())["identity"]
    assert new_identity["experts"][1] != old_identity["experts"][1]
    assert new_identity["experts"][0] == old_identity["experts"][0]
    # the α is the one a fresh search with the new experts finds, and names the new expert's bytes
    fresh = fit_fewshot(tiny, svd, _spec(ex), "arc_challenge", tmp_path / "fresh", **kw)
    assert res["alpha"] == fresh["alpha"] and fresh["provenance"]["restarted"] is None
    assert res["provenance"]["files"] == fresh["provenance"]["files"]
    # an unchanged rerun reuses the finished state (nothing restarts)
    again = fit_fewshot(tiny, svd, _spec(ex), "arc_challenge", out, **kw)
    assert again["alpha"] == res["alpha"] and again["provenance"]["restarted"] is None


def test_svd_cache_and_experts_are_checked_against_the_model(setup, tmp_path):
    from t2eval.adapt.experts import ExpertBank
    from t2eval.adapt.fewshot_cli import fit_fewshot
    from t2eval.svd import StaleCacheError, decompose, load_svd
    from t2eval.svf import ExpertVector
    from t2eval.testing import tiny_model_dir

    tiny, svd, experts, root, _ = setup
    other = str(tiny_model_dir(1))  # same shapes, other weights
    bank = ExpertBank(svd)
    bank.check_model(tiny, experts)  # its own model: fine
    with pytest.raises(StaleCacheError, match="decomposed from"):
        bank.check_model(other, experts)
    with pytest.raises(StaleCacheError, match="decomposed from"):  # cross-model experts: still this model's SVD
        ExpertBank(svd, cross_model=True).check_model(other, experts)
    # `fit-fewshot` refuses the mismatch before the model loads, without writing anything
    with pytest.raises(StaleCacheError):
        fit_fewshot(other, svd, _spec(experts), "arc_challenge", tmp_path / "x", iterations=1, population=2)
    assert not (tmp_path / "x" / "alpha.json").exists()

    # experts trained on another model: refused unless cross-model is allowed, naming the expert
    decompose(other, "mlp", out=tmp_path / "other.safetensors")
    other_svd = str(tmp_path / "other.safetensors")
    with pytest.raises(T2EvalError, match=r"expert 'code' .*trained on.*HINT"):
        ExpertBank(other_svd).check_model(other, {"code": experts["code"]}, hint=" HINT")
    ExpertBank(other_svd, cross_model=True).check_model(other, experts)
    # an expert of other shapes is refused even with cross-model allowed
    s = load_svd(other_svd)
    n0 = s.names[0]
    bad = {n: torch_ones(s.rank(n) - (n == n0)) for n in s.names}
    ExpertVector({n: v for n, v in bad.items()}, {"param": "code"}).save(tmp_path / "bad" / "z.safetensors")
    with pytest.raises(T2EvalError, match="does not fit this model"):
        ExpertBank(other_svd, cross_model=True).check_model(other, {"odd": tmp_path / "bad"})


def torch_ones(n):
    import torch

    return torch.ones(n)


def test_bank_mixes_as_the_search_did(setup):
    import torch

    from t2eval import svf
    from t2eval.adapt.experts import ExpertBank
    from t2eval.svd import load_svd

    tiny, svd, experts, root, _ = setup
    s = load_svd(svd)
    loaded = [svf.ExpertVector.load(Path(experts[n]) / "z.safetensors") for n in experts]
    alpha = [0.2, 0.5, 0.9]
    fitted = {"alpha": alpha, "experts": list(experts), "per": "vector", "normalised": False}
    for mix_space in ("raw_z", "mask"):
        for precision in ("fp32", "bf16"):
            want = svf.mix_scales(loaded, alpha, s, mix_space=mix_space, precision=precision)
            got = ExpertBank(svd, precision=precision).mix_fitted({**fitted, "mix_space": mix_space}, experts)
            assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    # alpha.json from before mix_space was recorded mixes raw z (the release)
    old = ExpertBank(svd).mix_fitted(fitted, experts)
    raw = svf.mix_scales(loaded, alpha, s, mix_space="raw_z")
    mask = svf.mix_scales(loaded, alpha, s, mix_space="mask")
    assert all(torch.equal(old[n], raw[n]) for n in raw) and any(not torch.equal(raw[n], mask[n]) for n in raw)
    bf = ExpertBank(svd, precision="bf16").mix_fitted(fitted, experts)
    assert any(not torch.equal(bf[n], raw[n]) for n in raw)
    assert all(torch.equal(bf[n], bf[n].bfloat16().float()) for n in bf)  # bf16 values
    single = ExpertBank(svd, precision="bf16").scales(experts["math"])
    assert all(torch.equal(single[n], svf.scales(loaded[0], s, precision="bf16")[n]) for n in single)
    with pytest.raises(T2EvalError, match="no path was given"):
        ExpertBank(svd).mix_fitted(fitted, {"math": experts["math"]})
    with pytest.raises(T2EvalError, match="precision"):
        ExpertBank(svd, precision="fp8")


def test_fit_fewshot_options_stay_light_and_in_step_with_svf():
    import dataclasses
    import subprocess
    import sys

    from t2eval import svf
    from t2eval.adapt.fewshot_cli import SVF_PRECISIONS, FitFewshotConfig

    assert SVF_PRECISIONS == svf.PRECISIONS
    f = {x.name: x for x in dataclasses.fields(FitFewshotConfig)}
    assert f["svf_precision"].metadata["choices"] == svf.PRECISIONS and f["svf_precision"].default == "fp32"
    assert f["protocol"].metadata["choices"] == ("release", "corrected") and f["protocol"].default is None
    # the workflow renders this stage's options at DAG-parse time: no torch import for that
    code = "import sys, t2eval.adapt.fewshot_cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
