"""t2eval.svd: target selection, streaming decomposition, cache validation and rebuilds, CLI."""

from __future__ import annotations

import json
import logging
import shutil
import struct
from collections.abc import Mapping

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


# --------------------------------------------------------------------------- streaming, integrity, resume

def test_load_streams_factors_on_access(tiny, cache_file, tmp_path, monkeypatch):
    assert not S.load_svd(cache_file).streamed  # a small cache stays resident by default
    monkeypatch.setenv("T2EVAL_SVD_RESIDENT_MAX_MB", "0")
    assert S.load_svd(cache_file).streamed
    c = S.load_svd(cache_file, resident=False)
    assert c.streamed and isinstance(c.U, Mapping) and list(c.U) == c.names and len(c.V) == len(c)
    with safe_open(cache_file, "pt") as h:
        ref = {k: h.get_tensor(k) for k in h.keys()}
    n = c.names[0]
    assert c.U[n] is not c.U[n]  # read on every access, nothing kept
    for m in c.names:
        U, Sg, V = c.usv(m)
        assert torch.equal(U, ref[m + ".U"]) and torch.equal(Sg, ref[m + ".S"]) and torch.equal(V, ref[m + ".V"])
        assert c.rank(m) == ref[m + ".S"].numel()
    with pytest.raises(KeyError):
        c.U["nope"]
    half = c.to(dtype=torch.bfloat16)
    assert half.streamed and half.U[n].dtype == torch.bfloat16 and torch.equal(half.V[n], ref[n + ".V"].bfloat16())
    res = S.load_svd(cache_file, resident=True)
    assert not res.streamed and torch.equal(res.U[n], ref[n + ".U"])
    # a cache rebuilt under the same name while one is open: the open one keeps reading its own file
    out = tmp_path / "c.safetensors"
    shutil.copy(cache_file, out)
    open_c = S.load_svd(out, resident=False)
    S.decompose(tiny_model_dir(1), "mlp", out)
    assert torch.equal(open_c.U[n], ref[n + ".U"])


def _zero_bytes(path, tensor, n_bytes=64):
    start, table, _ = S._st_table(path)
    a = start + table[tensor]["data_offsets"][0] + 16
    with open(path, "r+b") as f:
        f.seek(a)
        f.write(b"\0" * n_bytes)


def test_zeroed_factor_bytes_refused_and_rebuilt(tiny, cache_file, tmp_path, caplog):
    man = json.loads(S.manifest_path(cache_file).read_text())
    n = man["names"][2]
    assert set(man["matrices"][n]["sha256"]) == {"U", "S", "V"}
    out = tmp_path / "svd" / "z.safetensors"
    out.parent.mkdir()
    shutil.copy(cache_file, out)
    _zero_bytes(out, n + ".V")
    with pytest.raises(CorruptArtifactError, match=rf"{n}\.V does not match its sha256 checksum"):
        S.load_svd(out)
    with caplog.at_level(logging.WARNING, logger="t2eval.svd"):
        assert main(["decompose", "--model", str(tiny), "--targets", "mlp", "--out", str(out)]) == 0
    assert any("rebuilding" in r.message and "checksum" in r.message for r in caplog.records)
    c = S.load_svd(out, expect_model=tiny)
    assert c.manifest["matrices"][n]["sha256"] == man["matrices"][n]["sha256"]
    # a cache without checksums (an older format) is refused too
    with safe_open(cache_file, "pt") as h:
        meta, t = h.metadata(), {k: h.get_tensor(k) for k in h.keys()}
    m2 = json.loads(meta["manifest"])
    del m2["matrices"][n]["sha256"]
    save_file(t, str(tmp_path / "old.safetensors"), metadata={**meta, "manifest": json.dumps(m2)})
    with pytest.raises(CorruptArtifactError, match="no checksum"):
        S.load_svd(tmp_path / "old.safetensors")


def test_check_svd_for_model(tiny, cache_file, tmp_path):
    c = S.load_svd(cache_file)
    S.check_svd_for_model(c, tiny)
    S.check_svd_for_model(cache_file, tiny, full=True)
    other = tiny_model_dir(1)  # same architecture and shapes, other weights
    assert S.config_sha256(other) == S.config_sha256(tiny)
    for full in (False, True):
        with pytest.raises(S.StaleCacheError, match="not from the model .*other weights"):
            S.check_svd_for_model(c, other, full=full)
    # one element edited: the full hash and the sampled windows (the first window starts at byte 0) see it
    mdir = tmp_path / "model"
    shutil.copytree(tiny, mdir)
    w = _weights(mdir)
    w["model.layers.0.mlp.down_proj.weight"][0, 0] += 1.0
    save_file(w, str(mdir / "model.safetensors"), metadata={"format": "pt"})
    for full in (False, True):
        with pytest.raises(S.StaleCacheError, match="down_proj"):
            S.check_svd_for_model(c, mdir, full=full)
    with pytest.raises(S.StaleCacheError, match="config"):
        S.check_svd_for_model(c, tiny_model_dir(0, num_layers=3))


def _factors(path):
    with safe_open(path, "pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}, json.loads(h.metadata()["manifest"])


def _assert_same_cache(a, b):
    fa, ma = _factors(a)
    fb, mb = _factors(b)
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)  # bit-identical
    assert {n: m["sha256"] for n, m in ma["matrices"].items()} == {n: m["sha256"] for n, m in mb["matrices"].items()}
    assert ma["model"] == mb["model"] and ma["names"] == mb["names"]


def test_decompose_resumes_after_an_error(tmp_path, monkeypatch, caplog):
    model = tiny_model_dir(0, num_layers=4)
    ref = tmp_path / "ref.safetensors"
    S.decompose(model, "mlp", ref, threads=1)
    out = tmp_path / "r.safetensors"
    partial, progress = S.partial_paths(out)
    orig, calls = S._thin_svd, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return orig(*a, **k)

    monkeypatch.setattr(S, "_thin_svd", failing)
    with pytest.raises(KeyboardInterrupt):
        S.decompose(model, "mlp", out, threads=1)
    assert not out.exists() and partial.exists() and len(json.loads(progress.read_text())["done"]) == 4
    monkeypatch.setattr(S, "_thin_svd", orig)
    man = S.decompose(model, "mlp", out, threads=1)
    assert man["resumed_matrices"] == 4 and not partial.exists() and not progress.exists()
    _assert_same_cache(out, ref)
    # a partial whose recorded factors were damaged is not trusted: started over, same result
    monkeypatch.setattr(S, "_thin_svd", failing)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        S.decompose(model, "mlp", out, threads=1)
    monkeypatch.setattr(S, "_thin_svd", orig)
    first = json.loads(progress.read_text())["done"][0]["name"]
    reserve = json.loads(progress.read_text())["plan"]["reserve"]
    with open(partial, "r+b") as f:
        f.seek(8 + reserve + 4)
        f.write(b"\0" * 8)
    with caplog.at_level(logging.WARNING, logger="t2eval.svd"):
        man = S.decompose(model, "mlp", out, threads=1)
    assert man["resumed_matrices"] == 0 and any(first in r.message for r in caplog.records)
    _assert_same_cache(out, ref)
    # another plan (layers) never resumes a partial
    monkeypatch.setattr(S, "_thin_svd", failing)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        S.decompose(model, "mlp", out, threads=1)
    monkeypatch.setattr(S, "_thin_svd", orig)
    assert S.decompose(model, "mlp", out, layers="half", threads=1)["resumed_matrices"] == 0


_SLOW_CLI = """
import sys, time
import t2eval.svd as S
orig = S._thin_svd
def slow(*a, **k):
    time.sleep(0.25)
    return orig(*a, **k)
S._thin_svd = slow
from t2eval.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_cli_decompose_killed_midway_resumes(tmp_path):
    """`t2eval decompose` killed by SIGKILL after k matrices restarts at matrix k and ends with the
    same factors as an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    model = tiny_model_dir(0, num_layers=4)
    out = tmp_path / "svd" / "k.safetensors"
    args = ["decompose", "--model", str(model), "--targets", "mlp+attn", "--out", str(out), "--threads", "1"]
    partial, progress = S.partial_paths(out)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CLI, *args], env=os.environ.copy())
    deadline = time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if len(json.loads(progress.read_text())["done"]) >= 3:
                    proc.send_signal(signal.SIGKILL)
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    k = len(json.loads(progress.read_text())["done"])
    assert 3 <= k < 20 and not out.exists() and partial.exists()
    assert main(args) == 0
    man = json.loads(S.manifest_path(out).read_text())
    assert man["resumed_matrices"] == k and not partial.exists() and not progress.exists()
    ref = tmp_path / "ref.safetensors"
    S.decompose(model, "mlp+attn", ref, threads=1)
    _assert_same_cache(out, ref)
