"""`t2eval select-expert`: the λ sweep keeps the run with the best validation score."""

from __future__ import annotations

import json

import pytest

from t2eval.errors import T2EvalError
from t2eval.train.select import select


def _run(d, valids):
    d.mkdir(parents=True)
    rows = [{"iteration": i, **({"split_scores": {"valid": v}} if v is not None else {})} for i, v in enumerate(valids)]
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "z.safetensors").write_bytes(d.name.encode())
    return d


def test_selects_best_validation_and_records_all(tmp_path):
    a = _run(tmp_path / "kl0.0", [0.2, None, 0.4])
    b = _run(tmp_path / "kl0.1", [0.3, 0.5])
    c = _run(tmp_path / "kl0.2", [0.5, 0.1])  # ties with b: the first listed wins
    rec = select([a, b, c], tmp_path / "svf")
    assert rec["selected"] == str(b) and rec["valid"] == 0.5
    assert (tmp_path / "svf" / "z.safetensors").read_bytes() == b"kl0.1"
    assert [x["valid"] for x in json.loads((tmp_path / "svf" / "selection.json").read_text())["candidates"]] == [0.4, 0.5, 0.5]


def test_run_without_validation_scores_is_refused(tmp_path):
    a = _run(tmp_path / "kl0.0", [None, None])
    with pytest.raises(T2EvalError, match="no validation score"):
        select([a], tmp_path / "out")
    with pytest.raises(T2EvalError, match="missing"):
        select([tmp_path / "nope"], tmp_path / "out")


def test_cli_takes_candidates_space_separated(tmp_path, capsys):
    from t2eval.cli import main

    a = _run(tmp_path / "kl0.0", [0.2])
    b = _run(tmp_path / "kl0.1", [0.6])
    c = _run(tmp_path / "kl0.2", [0.4])
    assert main(["select-expert", "--candidates", str(a), str(b), str(c), "--out", str(tmp_path / "svf")]) == 0
    rec = json.loads((tmp_path / "svf" / "selection.json").read_text())
    assert rec["selected"] == str(b) and [x["dir"] for x in rec["candidates"]] == [str(a), str(b), str(c)]
