"""Decomposition cost: SVF's MLP targets vs every 2-D weight of the decoder layers, measured in one run.

    python benchmarks/bench_decompose.py [--model models/smollm2-135m] [--threads 1] [--out benchmarks/out]

"every 2-D weight" = q/k/v/o_proj + gate/up/down_proj of every layer; the token embedding (tied to
lm_head in SmolLM2) is excluded — SVF never targets it and it is ~40% of the parameters.
Prints seconds, matrices, SVF values and cache size per target set, the ratio all/mlp, and writes
the same as JSON to <out>/bench_decompose.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ALL_2D = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/smollm2-135m")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the SVD (1: stable on a shared machine; 0: torch's default)")
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from t2eval.provenance import record, write_json_atomic
    from t2eval.svd import decompose

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for label, targets in (("mlp", "mlp"), ("all_2d_no_embed", ALL_2D)):
        path = out / f"bench-{label}.safetensors"
        t0 = time.perf_counter()
        man = decompose(args.model, targets, path, threads=args.threads or None)
        wall = time.perf_counter() - t0
        rows[label] = {"targets": man["targets"], "wall_s": round(wall, 2), "svd_s": round(
            sum(m["seconds"] for m in man["matrices"].values()), 2), "matrices": len(man["names"]),
            "svf_values": man["n_params_svf"], "cache_mb": round(path.stat().st_size / 1e6, 1),
            "max_rel_err": man["max_rel_err"]}
        path.unlink()
        Path(str(path) + ".manifest.json").unlink(missing_ok=True)
    ratio = rows["all_2d_no_embed"]["wall_s"] / rows["mlp"]["wall_s"]
    res = {"model": args.model, "threads": args.threads or torch.get_num_threads(), "rows": rows,
           "ratio_all_over_mlp": round(ratio, 3),
           "provenance": record("bench_decompose", {"model": args.model, "threads": args.threads})}
    for k, r in rows.items():
        print(f"{k:>16}: {r['wall_s']:7.2f} s wall ({r['svd_s']:.2f} s in SVD+hash), {r['matrices']} matrices, "
              f"{r['svf_values']} SVF values, cache {r['cache_mb']} MB, max rel err {r['max_rel_err']:.1e}")
    print(f"ratio all-2D / MLP: {ratio:.2f}x")
    write_json_atomic(out / "bench_decompose.json", res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
