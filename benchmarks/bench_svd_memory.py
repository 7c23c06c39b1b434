"""Peak host memory of using an SVD cache: the eager loader (every factor in memory, as `load_svd`
did before streaming) vs the streamed `load_svd` (factors read from the file on access).

    python benchmarks/bench_svd_memory.py [--model models/smollm2-135m] [--work /tmp/bench_svd_memory]
                                          [--skip smollm2|llama8b-2l ...] [--out bench_svd_memory.json]

Cases, measured in the same run:
- ``smollm2``: the MLP cache of SmolLM2-135M (90 matrices, real SVD; built under --work when missing).
- ``llama8b-2l``: a Llama-3-8B-shaped MLP stack of 2 layers (gate/up 14336×4096, down 4096×14336,
  random bf16 weights in a fake model directory). Its cache is written by `decompose` with random
  factors of the right shapes instead of the SVD (minutes of LAPACK per matrix on a CPU; memory does
  not depend on the values); ``--real-svd`` runs the real SVD (use with ``--device cuda``).

Each (case, loader) runs in a fresh subprocess: load the cache, then compose W′ = U diag(σ⊙s) Vᵀ for
every matrix once (what `SVFPatcher.apply` / `SVFModule` do each step), discarding W′. Reported:
peak RSS above the process's RSS after imports (VmHWM − VmRSS₀, MB), load and compose seconds, and
the before/after ratios. The cache's size on disk is the O(model) reference. "after" is the streamed loader
(``resident=False``); by default `load_svd` keeps caches up to 1 GiB resident on the CPU (as SmolLM2's
is), since re-reading every factor on each composition costs time (the compose columns).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LLAMA8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(mode: str, cache_path: str) -> dict:
    """Runs in its own process: load the cache with `mode` (before | after), compose every W′."""
    import torch

    from t2eval import svd as S
    from t2eval.svf import compose

    torch.set_num_threads(1)
    rss0 = _status_kb("VmRSS")
    t0 = time.perf_counter()
    if mode == "before":  # the eager loader: every factor read into memory (old load_svd's reads)
        from safetensors import safe_open

        with safe_open(cache_path, "pt", device="cpu") as h:
            names = json.loads(h.metadata()["manifest"])["names"]
            U = {n: h.get_tensor(n + ".U") for n in names}
            Sg = {n: h.get_tensor(n + ".S") for n in names}
            V = {n: h.get_tensor(n + ".V") for n in names}
        for d in (U, Sg, V):
            assert all(torch.isfinite(t).all() for t in d.values())
        usv = lambda n: (U[n], Sg[n], V[n])  # noqa: E731
    else:
        cache = S.load_svd(cache_path, resident=False)
        names, usv = cache.names, cache.usv
    t_load = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    t1 = time.perf_counter()
    check = 0.0
    for n in names:
        u, s, v = usv(n)
        w = compose(u, s, v, 1.0 + 0.1 * torch.randn(s.numel(), generator=g))
        check += float(w[0, 0])
        del u, s, v, w
    t_compose = time.perf_counter() - t1
    return {"mode": mode, "peak_mb": (_status_kb("VmHWM") - rss0) / 1024, "rss0_mb": rss0 / 1024,
            "load_s": t_load, "compose_s": t_compose, "n_matrices": len(names), "check": check}


def _measure(mode: str, cache: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, __file__, "--child", mode, str(cache)], env=env, capture_output=True,
                       text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"child {mode} {cache} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def fake_llama_mlp_dir(root: Path, layers: int = 2) -> Path:
    """A model directory with only the MLP weights of `layers` Llama-3-8B-shaped decoder layers."""
    import torch
    from safetensors.torch import save_file

    d = root / f"llama8b-mlp-{layers}l"
    if (d / "model.safetensors").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    h, i = LLAMA8B["hidden_size"], LLAMA8B["intermediate_size"]
    w = {}
    for layer in range(layers):
        for k, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            w[f"model.layers.{layer}.mlp.{k}.weight"] = (0.02 * torch.randn(*shape, generator=g)).bfloat16()
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                               "num_hidden_layers": layers, **LLAMA8B}))
    return d


def _random_factors(w, device: str = "cpu"):
    """Stand-in for svd._thin_svd with the same output shapes/dtypes (values are irrelevant here)."""
    import torch

    m, k = w.shape
    r = min(m, k)
    g = torch.Generator().manual_seed(m * 7 + k)
    U = torch.randn(m, r, generator=g) / m ** 0.5
    V = torch.randn(k, r, generator=g) / k ** 0.5
    return U, torch.rand(r, generator=g).sort(descending=True).values, V, float("nan")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "models" / "smollm2-135m"))
    ap.add_argument("--work", default="/tmp/bench_svd_memory", help="where the caches and the fake model go")
    ap.add_argument("--skip", nargs="*", default=[], choices=["smollm2", "llama8b-2l"])
    ap.add_argument("--real-svd", action="store_true", help="llama8b-2l: real SVD instead of random factors")
    ap.add_argument("--device", default="cpu", help="device for --real-svd")
    ap.add_argument("--out", default=None, help="write the numbers (+ provenance) as JSON here")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "CACHE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return {}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from t2eval import svd as S

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    caches: dict[str, Path] = {}
    if "smollm2" not in args.skip:
        caches["smollm2"] = work / "smollm2-135m-mlp.safetensors"
        S.ensure_svd(args.model, "mlp", out=caches["smollm2"], threads=1)
    if "llama8b-2l" not in args.skip:
        mdir = fake_llama_mlp_dir(work)
        out = work / ("llama8b-2l-mlp" + ("-real" if args.real_svd else "") + ".safetensors")
        if not out.exists():
            real = S._thin_svd
            if not args.real_svd:
                S._thin_svd = _random_factors
            try:
                S.decompose(mdir, "mlp", out, device=args.device, threads=1)
            finally:
                S._thin_svd = real
        caches["llama8b-2l"] = out
    results = {}
    print(f"{'case':<12} {'cache MB':>9} {'peak MB before':>15} {'peak MB after':>14} {'ratio':>6} "
          f"{'load+compose s before':>22} {'after':>7}")
    for case, path in caches.items():
        b, a = _measure("before", path), _measure("after", path)
        assert abs(b["check"] - a["check"]) <= 1e-3 * max(1.0, abs(b["check"])), (b["check"], a["check"])
        size = path.stat().st_size / 2**20
        results[case] = {"cache_mb": size, "before": b, "after": a, "peak_ratio": b["peak_mb"] / a["peak_mb"],
                         "time_ratio": (a["load_s"] + a["compose_s"]) / (b["load_s"] + b["compose_s"])}
        print(f"{case:<12} {size:>9.0f} {b['peak_mb']:>15.0f} {a['peak_mb']:>14.0f} "
              f"{results[case]['peak_ratio']:>5.1f}x {b['load_s'] + b['compose_s']:>22.1f} "
              f"{a['load_s'] + a['compose_s']:>7.1f}")
    if args.out:
        from t2eval.provenance import record, write_json_atomic

        write_json_atomic(args.out, {"results": results, "provenance": record("bench_svd_memory", vars(args))})
    return results


if __name__ == "__main__":
    main()
