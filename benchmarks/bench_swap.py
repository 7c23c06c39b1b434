"""Expert-swap latency: HF in-place compose (svf.SVFPatcher) vs vLLM driver-side compose + reload vs
vLLM worker-side compose + reload, measured in one run on the same model and SVD cache.

    python benchmarks/bench_swap.py [--model models/smollm2-135m] [--repeats 3] [--out bench_swap.json]

For each method: `swap` = load a new random expert (code parameterisation, all targets),
`restore` = back to the base weights; medians over --repeats different experts. The first
worker-mode swap also loads U, σ, V into the worker (`worker_first_load`). A full vLLM reload of all
weights from disk (`reload_weights(weights_path=...)`) is timed as a reference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _experts(cache, n: int, seed: int = 0):
    import torch

    from t2eval import svf

    g = torch.Generator().manual_seed(seed)
    return [svf.scales({k: 0.1 + 0.3 * torch.randn(cache.rank(k), generator=g) for k in cache.names}, cache)
            for _ in range(n)]


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "models" / "smollm2-135m"))
    ap.add_argument("--svd", default=None, help="SVD cache (default: built/reused under svd/)")
    ap.add_argument("--targets", default="mlp")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--skip", nargs="*", default=[], help="methods to skip: hf worker reload reload-bytes disk")
    ap.add_argument("--out", default=None, help="write the numbers (+ provenance) as JSON here")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from t2eval.provenance import record, write_json_atomic
    from t2eval.svd import ensure_svd

    svd_out = args.svd or str(REPO / "svd" / f"{Path(args.model).name}-{args.targets}.safetensors")
    cache = ensure_svd(args.model, args.targets, out=svd_out)
    experts = _experts(cache, args.repeats)
    res: dict[str, dict] = {}

    if "hf" not in args.skip:
        from transformers import AutoModelForCausalLM

        from t2eval.svf import SVFPatcher

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
        patcher = SVFPatcher(model, cache)
        swap, restore = [], []
        for sc in experts:
            swap.append(patcher.apply(sc))
            restore.append(patcher.restore())
        res["hf"] = {"swap": swap, "restore": restore}
        del model, patcher

    from t2eval.backends.vllm import VLLMBackend

    be = VLLMBackend(args.model, dtype=args.dtype, svd=cache.path, max_model_len=1024, kv_cache_gib=1)
    try:
        for mode in ("worker", "reload", "reload-bytes"):
            if mode in args.skip:
                continue
            swap, restore = [], []
            first = None
            if mode == "worker":
                first = be.set_scales(experts[0], mode=mode)
                be.set_scales(None, mode=mode)
            for sc in experts:
                swap.append(be.set_scales(sc, mode=mode))
                restore.append(be.set_scales(None, mode=mode))
            res[f"vllm-{mode}"] = {"swap": swap, "restore": restore}
            if first is not None:
                res[f"vllm-{mode}"]["first_swap_incl_load"] = first
        if "disk" not in args.skip:
            dirs = str(be.model_dir)
            t = [_time(lambda: be.llm.collective_rpc("reload_weights", kwargs={"weights_path": dirs}))
                 for _ in range(args.repeats)]
            be.llm.reset_prefix_cache()
            res["vllm-disk-full"] = {"swap": t, "restore": t}
    finally:
        be.close()

    n_params = sum(cache.rank(n) for n in cache.names)
    summary = {k: {"swap_median_s": statistics.median(v["swap"]), "restore_median_s": statistics.median(v["restore"]),
                   **v} for k, v in res.items()}
    ref = summary.get("hf", {}).get("swap_median_s")
    print(f"\nexpert swap latency, {Path(args.model).name}, {len(cache.names)} {args.targets} matrices "
          f"({n_params} SVF values), {args.repeats} experts, torch threads {torch.get_num_threads()}")
    print(f"{'method':<20}{'swap s':>10}{'restore s':>12}{'swap / hf':>12}")
    for k, v in summary.items():
        ratio = f"{v['swap_median_s'] / ref:.2f}x" if ref else "-"
        print(f"{k:<20}{v['swap_median_s']:>10.3f}{v['restore_median_s']:>12.3f}{ratio:>12}")
    if "vllm-worker" in summary:
        print(f"vllm-worker first swap (incl. loading U, S, V into the worker): "
              f"{summary['vllm-worker']['first_swap_incl_load']:.3f} s")
    out = {"model": args.model, "svd": str(cache.path), "targets": args.targets, "n_matrices": len(cache.names),
           "repeats": args.repeats, "results": summary,
           "provenance": record("bench-swap", vars(args), inputs={"svd": str(cache.path)})}
    if args.out:
        write_json_atomic(args.out, out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
