"""The release / corrected protocol table: values, overrides, errors, and the README copy."""

from __future__ import annotations

import re

import pytest

from t2eval import protocol
from t2eval.cli import main
from t2eval.errors import T2EvalError

from conftest import REPO


def test_release_is_the_default_and_differs_from_corrected(monkeypatch):
    monkeypatch.delenv(protocol.ENV_VAR, raising=False)
    rel, cor = protocol.settings(), protocol.settings("corrected")
    assert rel == protocol.settings("release")
    assert rel["arc_numeric_keys"] == "code" and cor["arc_numeric_keys"] == "position"
    assert rel["dispatch_other"] == "last_expert" and cor["dispatch_other"] == "base"
    assert rel["fewshot_select"] == "reported_set" and cor["fewshot_select"] == "final_incumbent"
    assert set(rel) == set(protocol.KNOB_NAMES)


def test_env_var_picks_the_protocol(monkeypatch):
    monkeypatch.setenv(protocol.ENV_VAR, "corrected")
    assert protocol.default_protocol() == "corrected"
    assert protocol.settings()["bos"] == "single"
    monkeypatch.setenv(protocol.ENV_VAR, "nonsense")
    with pytest.raises(T2EvalError, match="protocol='nonsense'"):
        protocol.default_protocol()


def test_overrides_and_record():
    rec = protocol.record("release", {"arc_numeric_keys": "position"})
    assert rec["name"] == "release" and rec["overrides"] == {"arc_numeric_keys": "position"}
    assert rec["knobs"]["arc_numeric_keys"] == "position" and rec["knobs"]["bos"] == "double"
    with pytest.raises(T2EvalError, match="unknown protocol knob"):
        protocol.settings("release", bogus=1)
    with pytest.raises(T2EvalError, match="use one of release, corrected"):
        protocol.settings("paper")


def test_fewshot_seeds_per_task():
    assert [protocol.fewshot_seed(t) for t in ("math", "arc_challenge", "humaneval")] == [27, 38, 16]
    with pytest.raises(T2EvalError, match="no few-shot seed"):
        protocol.fewshot_seed("gsm8k")


def test_cli_prints_every_knob(capsys):
    assert main(["protocol"]) == 0
    out = capsys.readouterr().out
    for k in protocol.KNOBS:
        assert k.name in out


def test_readme_table_is_the_generated_one():
    readme = (REPO / "README.md").read_text()
    m = re.search(r"<!-- protocol-table:start -->\n(.*?)\n<!-- protocol-table:end -->", readme, re.S)
    assert m, "README lacks the protocol table markers"
    assert m.group(1).strip() == protocol.table("md").strip(), \
        "README's protocol table is stale: paste `t2eval protocol --format md` between the markers"
