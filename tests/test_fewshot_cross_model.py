"""Table 5's cross-model few-shot path end to end on two different tiny models: experts saved for
tiny seed 0 are refused on tiny seed 1 by `t2eval fit-fewshot` without `--allow-cross-model` and
adapted with it (the same command line the paper DAG's `fit_fewshot_cross_model` rule builds)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    import torch

    from t2eval.svd import decompose, load_svd
    from t2eval.svf import ExpertVector
    from t2eval.testing import tiny_model_dir

    root = tmp_path_factory.mktemp("xfer")
    src, dst = str(tiny_model_dir(seed=0)), str(tiny_model_dir(seed=1))
    decompose(src, "mlp", out=root / "src.safetensors")
    decompose(dst, "mlp", out=root / "dst.safetensors")
    svd_src = load_svd(root / "src.safetensors")
    experts = {}
    for i, name in enumerate(["math", "code", "reasoning"]):
        g = torch.Generator().manual_seed(3 + i)
        z = {n: 2.0 * torch.randn(svd_src.rank(n), generator=g) for n in svd_src.names}
        ExpertVector.from_svd(z, svd_src, param="code", task=name).save(root / "experts" / name / "z.safetensors")
        experts[name] = str(root / "experts" / name / "z.safetensors")
    return src, dst, str(root / "dst.safetensors"), ",".join(f"{n}:{p}" for n, p in experts.items()), root


def _argv(dst, svd, experts, out, data_dir, *extra):
    return ["fit-fewshot", "--model", dst, "--svd", svd, "--experts", experts, "--task", "arc_challenge",
            "--out", str(out), "--data-dir", str(data_dir), "--iterations", "1", "--population", "2",
            "--max-new-tokens", "2", "--batch-size", "10", *extra]


def test_fit_fewshot_refuses_other_models_experts_without_the_flag(two_models, data_mirror, capsys):
    from t2eval.cli import main

    _, dst, svd, experts, root = two_models
    rc = main(_argv(dst, svd, experts, root / "refused", data_mirror))
    err = capsys.readouterr().err
    assert rc == 2 and "--allow-cross-model" in err and "trained on tiny-llama" in err, err
    assert not (root / "refused" / "alpha.json").exists()


def test_fit_fewshot_cross_model_with_the_flag(two_models, data_mirror):
    from t2eval.cli import main

    src, dst, svd, experts, root = two_models
    out = root / "xfer"
    assert main(_argv(dst, svd, experts, out, data_mirror, "--allow-cross-model")) == 0
    saved = json.loads((out / "alpha.json").read_text())
    assert saved["experts"] == ["math", "code", "reasoning"] and len(saved["alpha"]) == 3
    assert saved["n_heldout"] == 10 and saved["provenance"]["config"]["allow_cross_model"] is True
    # the α found is usable by the `t2` wrapper on the target model with the source model's experts
    from t2eval.lm import T2LM

    lm = T2LM(pretrained=dst, strategy="fewshot", svd=svd, alpha=str(out), cross_model="true", batch_size=4,
              experts=experts.replace(",", ";"))
    assert set(lm.t2_fixed) and src != dst
