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
    assert protocol.fewshot_seed("math", "release") == 27
    with pytest.raises(T2EvalError, match="unseen task 'gsm8k'"):
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


def test_protocol_reaches_tasks_and_data(monkeypatch):
    from t2eval.tasks import get_task

    monkeypatch.setenv(protocol.ENV_VAR, "release")       # restored after the test (protocol.use below)
    monkeypatch.setenv(protocol.OVERRIDES_ENV_VAR, "{}")
    rel, cor = get_task("arc_easy"), get_task("arc_easy", protocol="corrected")
    doc = {"question": "Q?", "answerKey": "2", "choices": {"text": list("wxyz"), "label": ["1", "2", "3", "4"]}}
    assert rel.protocol == "release" and not rel.score_one(doc, "the answer is (B)")
    assert cor.protocol == "corrected" and cor.score_one(doc, "the answer is (B)")
    assert "```" not in get_task("mbpp").gen_kwargs["stop"]
    assert "```" in get_task("mbpp", protocol="corrected").gen_kwargs["stop"]
    assert get_task("gsm8k", protocol="corrected").extractor == "signed"
    # explicit options win over the protocol
    assert get_task("arc_easy", protocol="corrected", numeric_keys="release").score_one(doc, "(B)") is False
    assert rel.data_options["mbppplus_version"] == "v0.1.0" and rel.data_options["math_order"] == "hf"
    # the environment carries the protocol and the overrides to every layer (CLI --protocol, t2 protocol=)
    protocol.use("corrected", {"gsm8k_extractor": "code"})
    assert get_task("arc_easy").protocol == "corrected"
    assert get_task("gsm8k").extractor == "code"
    assert protocol.record()["overrides"] == {"gsm8k_extractor": "code"}
