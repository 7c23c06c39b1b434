"""Shared fixtures: repo paths, the data mirror, the embedded model (built once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


_PROTOCOL_ENV = ("T2EVAL_PROTOCOL", "T2EVAL_PROTOCOL_OVERRIDES")


@pytest.fixture(autouse=True)
def _fresh_protocol_env():
    """Every test starts under the default protocol: building a `t2` model or calling `protocol.use` sets the
    process's protocol (by design: the task layer must agree with the model), which must not leak into the
    next test."""
    saved = {k: os.environ.pop(k, None) for k in _PROTOCOL_ENV}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def mirror_dir() -> Path:
    return Path(os.environ.get("T2EVAL_DATA_MIRROR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_mirror() -> Path:
    d = mirror_dir()
    if not d.is_dir():
        pytest.skip(f"data mirror not found at {d} (set T2EVAL_DATA_MIRROR)")
    return d


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from t2eval.testing import tiny_model_dir

    return tiny_model_dir(seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_model) -> Path:
    """The tiny random Llama (the name the trainer tests use)."""
    return tiny_model


@pytest.fixture(scope="session")
def svd_path(tiny_model, tmp_path_factory) -> Path:
    """The tiny model's MLP SVD cache, decomposed once per session (read-only for the tests that share it)."""
    from t2eval.svd import decompose

    out = tmp_path_factory.mktemp("svd") / "tiny-mlp.safetensors"
    decompose(tiny_model, "mlp", out)
    return out


@pytest.fixture(scope="session")
def tiny_vlm() -> Path:
    """The tiny random LLaVA-NeXT (vision-language tests)."""
    from t2eval.models.llava import tiny_llava_next_dir

    return tiny_llava_next_dir(0)


@pytest.fixture(scope="session")
def vlm_svd(tiny_vlm, tmp_path_factory) -> str:
    """The tiny VLM's MLP SVD cache (language model only), decomposed once per session (read-only)."""
    from t2eval.svd import decompose

    out = tmp_path_factory.mktemp("vlm-svd") / "tiny-llava-next-mlp.safetensors"
    decompose(tiny_vlm, "mlp", out=out)
    return str(out)


def per_sample_pg(model, svd, z, samples, n: int):
    """The REINFORCE reference the batched trainer loss must equal: one un-batched forward per sequence with
    W′(z) (`svf.functional_weights`, code parameterisation), loss −r/n · log π(completion | prompt).
    `samples`: (prompt ids, completion ids, reward, extra forward kwargs such as a VLM's pixel values);
    empty completions are skipped. Returns (the z gradient as one vector, the summed loss)."""
    import torch
    from torch.func import functional_call

    from t2eval import svf

    total = torch.zeros(sum(v.numel() for v in z.values()))
    pg = 0.0
    for p, c, r, extra in samples:
        if not c:
            continue
        W = svf.functional_weights(z, svd, "code")
        kw = {"input_ids": torch.tensor([list(p) + list(c)]), **extra}
        logits = functional_call(model, W, args=(), kwargs=kw).logits[0, len(p) - 1:-1]
        ll = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None]).sum()
        loss = -ll * r / n
        grads = torch.autograd.grad(loss, list(z.values()))
        total += torch.cat([g.reshape(-1) for g in grads])
        pg += float(loss.detach())
    return total, pg


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The embedded model as an fp32 HF directory: reuses models/smollm2-135m when prepared, else builds it."""
    prepared = REPO / "models" / "smollm2-135m"
    if (prepared / "model.safetensors").exists() and (prepared / "t2eval_model.json").exists():
        return prepared
    from t2eval.models.embedded import build_smollm2

    return build_smollm2(tmp_path_factory.mktemp("models") / "smollm2-135m", dtype="float32")


def snakemake_job_counts(out: str) -> dict[str, int]:
    """Job counts per rule from the "Job stats" table that `snakemake -n` prints."""
    counts, on = {}, False
    for line in out.splitlines():
        if line.startswith("job ") and "count" in line:
            on = True
            continue
        if on:
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                counts[parts[0]] = int(parts[1])
            elif parts and parts[0] == "total":
                break
    return counts


def snakemake_shell_commands(stdout: str) -> list[tuple[str, str]]:
    """(rule, shell command) of every job that `snakemake -n -p` prints."""
    jobs, rule = [], None
    for line in stdout.splitlines():
        if line.startswith("rule ") and line.rstrip().endswith(":"):
            rule = line.split()[1].rstrip(":")
        elif line.startswith("Shell command: ") and rule is not None:
            cmd = line[len("Shell command: "):].strip()
            if cmd != "None":
                jobs.append((rule, cmd))
            rule = None
    return jobs
