"""t2eval.svd: target selection, streaming decomposition, cache validation and rebuilds, CLI."""

from __future__ import annotations

import json
import logging
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from t2eval import svd as S
from t2eval.cli import main
from t2eval.errors import CorruptArtifactError, T2EvalError
from t2eval.testing import tiny_model_dir


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_dir(0)


@pytest.fixture(scope="module")
def cache_file(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("svd") / "tiny-mlp.safetensors"
    S.decompose(tiny, "mlp", out)
    return out


def _weights(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


def test_target_names_sets_layers_and_order(tiny):
    mlp = S.target_names(tiny, "mlp")
    assert mlp == [f"model.layers.{i}.mlp.{k}_proj.weight" for i in (0, 1) for k in ("down", "gate", "up")]
    attn = S.target_names(tiny, "attn")
    assert {n.split(".")[-2] for n in attn} == {"q_proj", "v_proj"} and len(attn) == 4
    assert len(S.target_names(tiny, "mlp+attn")) == 10
    assert S.normalise_targets(["v_proj", "self_attn.q_proj"])[0] == "custom:self_attn.q_proj,v_proj"
    assert S.normalise_targets("mlp.up_proj,mlp.down_proj,mlp.gate_proj")[0] == "mlp"
    assert S.target_names(tiny, ["o_proj"]) == ["model.layers.0.self_attn.o_proj.weight",
                                               "model.layers.1.self_attn.o_proj.weight"]
    # upper half of the layers, natural (numeric) order, layer count from the names
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(12)] + ["lm_head.weight"]
    assert S.target_names(names, "mlp", "half") == [f"model.layers.{i}.mlp.up_proj.weight" for i in range(6, 12)]
    assert S.target_names(names, "mlp", "half-lower")[-1] == "model.layers.5.mlp.up_proj.weight"
    assert S.target_names(names, "mlp", "0-1,10") == [f"model.layers.{i}.mlp.up_proj.weight" for i in (0, 1, 10)]
    assert S.select_layers("half", 80) == list(range(40, 80))
    with pytest.raises(T2EvalError, match="no weight matches"):
        S.target_names(tiny, ["nonexistent_proj"])
    with pytest.raises(T2EvalError, match="out of range"):
        S.target_names(tiny, "mlp", [5])


def test_decompose_file_reconstructs_and_has_manifest(tiny, cache_file):
    w = _weights(tiny)
    with safe_open(cache_file, "pt") as h:
        keys = set(h.keys())
        man = json.loads(h.metadata()["manifest"])
    names = S.target_names(tiny, "mlp")
    assert keys == {n + s for n in names for s in (".U", ".S", ".V")}
    c = S.load_svd(cache_file, expect_model=tiny, expect_targets="mlp", expect_layers="all")
    for n in names:
        U, Sg, V = c.usv(n)
        W = w[n]
        assert U.shape == (W.shape[0], min(W.shape)) and V.shape == (W.shape[1], min(W.shape))
        assert torch.all(Sg[:-1] >= Sg[1:])  # descending
        rec = (U * Sg) @ V.T  # W = U diag(S) Vᵀ: V, not Vh
        assert (torch.linalg.norm(rec - W) / torch.linalg.norm(W)).item() <= 1e-5
    assert man["targets"] == "mlp" and man["names"] == names
    assert man["max_rel_err"] <= 1e-5 and set(man["matrices"]) == set(names)
    assert len(man["model"]["tensors"][names[0]]["sha256"]) == 64
    assert man["model"]["config_sha256"] == S.config_sha256(tiny)
    assert man["provenance"]["stage"] == "decompose"
    assert man["n_params_svf"] == sum(min(w[n].shape) for n in names)
    assert json.loads(S.manifest_path(cache_file).read_text())["names"] == names


def test_ensure_reuses_valid_cache(tiny, cache_file, tmp_path, caplog):
    out = tmp_path / "c.safetensors"
    shutil.copy(cache_file, out)
    before = out.stat().st_mtime_ns
    with caplog.at_level(logging.WARNING):
        c = S.ensure_svd(tiny, "mlp", out)
    assert out.stat().st_mtime_ns == before and not caplog.records
    assert len(c) == 6


def _corrupt_variants(src, tmp_path):
    data = src.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) - 1000])
    (tmp_path / "badheader.safetensors").write_bytes(struct.pack("<Q", 10**12) + data[8:])
    with safe_open(src, "pt") as h:
        meta = h.metadata()
        t = {k: h.get_tensor(k) for k in h.keys()}
    first = json.loads(meta["manifest"])["names"][0]
    save_file({k: v for k, v in t.items() if k != first + ".V"}, str(tmp_path / "missing.safetensors"), metadata=meta)
    t_nan = dict(t)
    t_nan[first + ".S"] = t[first + ".S"].clone()
    t_nan[first + ".S"][3] = float("nan")
    save_file(t_nan, str(tmp_path / "nan.safetensors"), metadata=meta)
    return ["truncated", "badheader", "missing", "nan"]


def test_corrupt_cache_detected_and_rebuilt(tiny, cache_file, tmp_path, caplog):
    for kind in _corrupt_variants(cache_file, tmp_path):
        p = tmp_path / f"{kind}.safetensors"
        with pytest.raises(CorruptArtifactError, match="corrupted"):
            S.load_svd(p)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="t2eval.svd"):
            c = S.ensure_svd(tiny, "mlp", p)
        assert any("rebuilding" in r.message for r in caplog.records), kind
        assert len(c) == 6 and S.load_svd(p, expect_model=tiny).manifest["max_rel_err"] <= 1e-5


def test_stale_cache_other_model_targets_weights(tiny, cache_file, tmp_path, caplog):
    other = tiny_model_dir(1)  # same architecture, other weights
    with pytest.raises(S.StaleCacheError, match="changed"):
        S.load_svd(cache_file, expect_model=other)
    with pytest.raises(S.StaleCacheError, match="targets"):
        S.load_svd(cache_file, expect_targets="attn")
    with pytest.raises(S.StaleCacheError, match="layers"):
        S.load_svd(cache_file, expect_layers="half")
    # same model dir, one target tensor edited in place (shapes unchanged)
    mdir = tmp_path / "model"
    shutil.copytree(tiny, mdir)
    out = tmp_path / "c.safetensors"
    shutil.copy(cache_file, out)
    S.load_svd(out, expect_model=mdir)  # valid for the copy
    w = _weights(mdir)
    w["model.layers.1.mlp.up_proj.weight"][0, 0] += 1.0
    save_file(w, str(mdir / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="t2eval.svd"):
        c = S.ensure_svd(mdir, "mlp", out)
    assert any("stale" in r.message for r in caplog.records)
    U, Sg, V = c.usv("model.layers.1.mlp.up_proj.weight")
    assert torch.allclose((U * Sg) @ V.T, w["model.layers.1.mlp.up_proj.weight"], atol=1e-5)
    # other targets: rebuilt with the new target set
    c2 = S.ensure_svd(mdir, "attn", out)
    assert c2.targets == "attn" and len(c2) == 4


def test_cli_decompose_and_reuse(tiny, tmp_path, capsys):
    out = tmp_path / "svd" / "x.safetensors"
    assert main(["decompose", "--model", str(tiny), "--targets", "mlp+attn", "--out", str(out),
                 "--layers", "half"]) == 0
    c = S.load_svd(out, expect_targets="mlp+attn", expect_layers="half")
    assert all(".layers.1." in n for n in c.names) and len(c) == 5
    m1 = out.stat().st_mtime_ns
    assert main(["decompose", "--model", str(tiny), "--targets", "mlp+attn", "--out", str(out),
                 "--layers", "half"]) == 0
    assert out.stat().st_mtime_ns == m1  # reused
    assert main(["decompose", "--model", str(tiny), "--targets", "bogus_proj", "--out", str(out)]) == 2
    assert "no weight matches" in capsys.readouterr().err
    assert not list(out.parent.glob(".*tmp*"))  # no temp files left


@pytest.mark.slow
def test_decompose_smollm2_mlp(smollm2_dir, tmp_path):
    out = tmp_path / "smollm2-mlp.safetensors"
    man = S.decompose(smollm2_dir, "mlp", out, threads=1)
    assert len(man["names"]) == 90 and man["n_params_svf"] == 90 * 576
    assert man["max_rel_err"] <= 1e-5
