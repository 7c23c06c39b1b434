"""Resume that cannot get stuck: the trainers rewrite their declared outputs from the checkpoint.

Snakemake's `--rerun-incomplete` deletes a job's declared outputs (z.safetensors and log.jsonl; the
LoRA adapter files) before re-running it. Whether the run was interrupted mid-way or had already
finished, the re-run must produce the same bytes an uninterrupted run produces."""

from __future__ import annotations

from pathlib import Path

import pytest


from test_reinforce import ToyTask

SVF_OUTPUTS = ("z.safetensors", "log.jsonl", "provenance.json")
LORA_OUTPUTS = ("adapter_config.json", "adapter_model.safetensors", "log.jsonl", "provenance.json")


def _svf(tiny, svd_path, out, **kw):
    from t2eval.train.reinforce import SVFTrainConfig, train_svf

    cfg = SVFTrainConfig(**{**dict(model=str(tiny), svd=str(svd_path), task="toy", out=str(out), iterations=3,
                                   batch_size=4, micro_batch=2, max_new_tokens=4, eval_every=1, lr=0.5,
                                   grad_clip=1.0, seed=1, progress=False), **kw})
    return train_svf(cfg, task=ToyTask())


def _lora(tiny, out, **kw):
    from t2eval.train.lora import LoRATrainConfig, train_lora

    cfg = LoRATrainConfig(**{**dict(model=str(tiny), task="toy", out=str(out), iterations=3, batch_size=4,
                                    micro_batch=2, max_new_tokens=4, eval_every=1, lr=5e-3, seed=1,
                                    progress=False), **kw})
    return train_lora(cfg, task=ToyTask())


def _delete(out: Path, names) -> None:
    for n in names:
        (out / n).unlink(missing_ok=True)


def _content(out: Path, names) -> dict:
    """The outputs' content: bytes, except z.safetensors (its metadata keys are written in a random
    order by safetensors, so equal experts can differ in bytes): tensors + metadata."""
    from t2eval.svf import ExpertVector

    got = {}
    for n in names:
        if n == "z.safetensors":
            ev = ExpertVector.load(out / n)
            got[n] = ({k: v.tolist() for k, v in ev.z.items()}, ev.meta)
        elif n != "provenance.json":
            got[n] = (out / n).read_bytes()
    return got


def _rows_without_time(out: Path) -> list[dict]:
    import json

    return [{k: v for k, v in json.loads(line).items() if k != "time"}
            for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["svf", "lora"])
def test_deleted_outputs_are_rewritten_mid_run_and_after_finish(method, tiny, svd_path, tmp_path):
    run = (lambda out, **kw: _svf(tiny, svd_path, out, **kw)) if method == "svf" else \
          (lambda out, **kw: _lora(tiny, out, **kw))
    outputs = SVF_OUTPUTS if method == "svf" else LORA_OUTPUTS
    ref, out = tmp_path / "uninterrupted", tmp_path / "interrupted"
    assert run(ref)["finished"]
    want = _content(ref, outputs)

    # killed after iteration 0; Snakemake deletes the declared outputs, a partial log row is left behind
    assert not run(out, stop_after=1)["finished"]
    _delete(out, outputs)
    (out / "log.jsonl").write_text('{"iteration": 1, "partial": true}\n')
    assert not run(out, stop_after=1)["finished"]
    assert len(_rows_without_time(out)) == 2
    _delete(out, outputs)
    assert run(out)["finished"]  # resumes at iteration 2 and finishes
    assert _rows_without_time(out) == _rows_without_time(ref)
    artefact = "z.safetensors" if method == "svf" else "adapter_model.safetensors"
    assert _content(out, [artefact]) == {artefact: want[artefact]}  # bit-identical best state

    # finished, then the outputs are deleted again (the stuck case): a re-run rewrites the same bytes
    done = _content(out, outputs)
    _delete(out, outputs)
    summary = run(out)
    assert summary["finished"] and summary["iterations_done"] == 3
    assert _content(out, outputs) == done
    assert (out / "provenance.json").exists()
