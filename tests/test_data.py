"""Dataset layer: `t2eval prepare-data` on the real mirror, and the protocol's splits."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest

from t2eval.cli import main as cli_main
from t2eval.data import load_jsonl, manifest
from t2eval.data import splits as S
from t2eval.data.datasets import SPECS, prepare_data, resolve_mirror
from t2eval.errors import MissingDatasetError, T2EvalError

REPO = Path(__file__).resolve().parent.parent
MIRROR = Path(os.environ.get("T2EVAL_DATA_MIRROR") or REPO.parent / "shared" / "data")
pytestmark = pytest.mark.skipif(not (MIRROR / "gsm8k").is_dir(),
                                reason=f"dataset mirror not found at {MIRROR} (set T2EVAL_DATA_MIRROR)")

EXPECTED_ROWS = {
    "gsm8k": {"train": 7473, "test": 1319},
    "arc_easy": {"train": 2251, "validation": 570, "test": 2376},
    "arc_challenge": {"test": 1172},
    "math": {"train": 7500, "test": 5000, "math500": 500},
    "humaneval": {"test": 164},
    # every release in the mirror is materialised as its own split (PROTOCOL §8: the code release
    # used MBPP+ v0.1.0 and HumanEval+ v0.1.9; evalplus's current ones are v0.2.0 / v0.1.10)
    "humanevalplus": {"test-v0.1.9": 164, "test-v0.1.10": 164},
    "mbppplus": {"test-v0.1.0": 399, "test-v0.2.0": 378},
    "mbpp": {"train": 374, "validation": 90, "test": 500, "prompt": 10},
}
CLS_N = {"math": 399, "code": 378, "reasoning": 399}          # MBPP+ v0.2.0 has only 378
CLS_LEAKFREE_N = {"math": 399, "code": 300, "reasoning": 399}
# the data options before the release-exact protocol (PROTOCOL §8); the old assertions run under them
OLD = dict(mbppplus_version="v0.2.0", humanevalplus_version="v0.1.10", math_order="mirror",
           fewshot_seeds="uniform", cls_split="per_source", cls_code_text="prompt")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    t0 = time.perf_counter()
    prepare_data(out, mirror=MIRROR)
    dt = time.perf_counter() - t0
    print(f"\nprepare-data (all datasets, from the mirror): {dt:.2f}s")
    assert dt < 60
    return out


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("T2EVAL_DATA_MIRROR", raising=False)


def _mirror_with(tmp_path: Path, name: str) -> Path:
    m = tmp_path / "mirror"
    shutil.copytree(MIRROR / name, m / name)
    for p in (m / name).iterdir():
        p.chmod(0o644)
    return m


# ------------------------------------------------------------------ prepare-data

def test_prepare_all_counts_and_manifest(prepared):
    man = manifest(prepared)
    assert set(man["datasets"]) == set(EXPECTED_ROWS)
    for name, splits in EXPECTED_ROWS.items():
        entry = man["datasets"][name]
        assert set(entry) == set(splits)
        for split, n in splits.items():
            e = entry[split]
            p = prepared / e["path"]
            assert e["path"] == f"{name}/{split}.jsonl"
            assert e["rows"] == n == len(load_jsonl(name, split, prepared))
            assert e["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
            assert e["source"].startswith("mirror:")
            assert e["version"]
    for name in ("mbppplus", "humanevalplus"):
        for split, e in man["datasets"][name].items():
            assert split == f"test-{e['version']}"
    assert man["datasets"]["mbppplus"]["test-v0.2.0"]["version"] == "v0.2.0"
    assert man["datasets"]["humanevalplus"]["test-v0.1.10"]["version"] == "v0.1.10"
    assert man["datasets"]["mbppplus"]["test-v0.1.0"]["version"] == "v0.1.0"
    assert man["datasets"]["humanevalplus"]["test-v0.1.9"]["version"] == "v0.1.9"
    assert not list(prepared.rglob(".*tmp*")), "temp files left behind"


def test_rows_keep_source_fields(prepared):
    src = [json.loads(line) for line in open(MIRROR / "gsm8k" / "test.jsonl")]
    assert load_jsonl("gsm8k", "test", prepared) == src
    for version in ("v0.2.0", "v0.1.0"):
        with gzip.open(MIRROR / "mbppplus" / f"MbppPlus-{version}.jsonl.gz", "rt") as f:
            listed = [json.loads(line) for line in f]
        assert load_jsonl("mbppplus", f"test-{version}", prepared) == listed
    mbpp = {s: [r["task_id"] for r in load_jsonl("mbpp", s, prepared)] for s in EXPECTED_ROWS["mbpp"]}
    assert (min(mbpp["prompt"]), max(mbpp["prompt"])) == (1, 10)
    assert (min(mbpp["test"]), max(mbpp["test"])) == (11, 510)
    assert (min(mbpp["validation"]), max(mbpp["validation"])) == (511, 600)
    assert (min(mbpp["train"]), max(mbpp["train"])) == (601, 974)


def test_idempotent_and_force(prepared, tmp_path):
    out = tmp_path / "d"
    shutil.copytree(prepared, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.jsonl")}
    sha_before = {k: {s: e["sha256"] for s, e in v.items()} for k, v in manifest(out)["datasets"].items()}
    t0 = time.perf_counter()
    prepare_data(out, mirror=MIRROR)
    assert time.perf_counter() - t0 < 5
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.jsonl")} == before  # nothing rewritten
    # a file that no longer matches the manifest is rewritten; --force rewrites everything identically
    (out / "humaneval" / "test.jsonl").write_text("{}\n")
    prepare_data(out, mirror=MIRROR, datasets=["humaneval"])
    assert len(load_jsonl("humaneval", "test", out)) == 164
    prepare_data(out, mirror=MIRROR, datasets=["gsm8k"], force=True)
    assert (out / "gsm8k" / "test.jsonl").stat().st_mtime_ns != before[out / "gsm8k" / "test.jsonl"]
    sha_after = {k: {s: e["sha256"] for s, e in v.items()} for k, v in manifest(out)["datasets"].items()}
    assert sha_after == sha_before


def test_cli_subset(tmp_path, capsys):
    rc = cli_main(["prepare-data", "--mirror", str(MIRROR), "--out", str(tmp_path / "d"),
                   "--datasets", "arc_challenge,humaneval"])
    assert rc == 0
    assert set(manifest(tmp_path / "d")["datasets"]) == {"arc_challenge", "humaneval"}
    assert "1172 rows" in capsys.readouterr().out


# ------------------------------------------------------------------ errors

def test_missing_dataset_names_dataset_and_both_remedies(tmp_path, offline):
    empty = tmp_path / "empty"
    empty.mkdir()
    t0 = time.perf_counter()
    with pytest.raises(MissingDatasetError) as ei:
        prepare_data(tmp_path / "d", mirror=empty, datasets=["gsm8k"])
    assert time.perf_counter() - t0 < 2, "offline failure must be fast"
    msg = str(ei.value)
    assert "'gsm8k'" in msg and str(empty / "gsm8k" / "train.jsonl") in msg
    assert "--mirror" in msg and "T2EVAL_DATA_MIRROR" in msg          # remedy 1: mirror
    assert "HF_HUB_OFFLINE" in msg and "openai/gsm8k" in msg          # remedy 2: hub access
    # no mirror at all: same error class, says none is configured; the CLI turns it into exit 2
    with pytest.raises(MissingDatasetError, match="no data mirror configured"):
        prepare_data(tmp_path / "d", datasets=["mbppplus"])
    assert cli_main(["prepare-data", "--out", str(tmp_path / "d"), "--datasets", "humaneval"]) == 2


def test_malformed_rows_report_file_and_line(tmp_path, offline):
    m = _mirror_with(tmp_path, "arc_challenge")
    f = m / "arc_challenge" / "test.jsonl"
    lines = f.read_text().splitlines(keepends=True)

    def attempt(mutated: list[str]) -> str:
        f.write_text("".join(mutated))
        with pytest.raises(T2EvalError) as ei:
            prepare_data(tmp_path / "d", mirror=m, datasets=["arc_challenge"])
        return str(ei.value)

    bad = list(lines)
    bad[4] = bad[4][:40] + "\n"
    assert f"{f}:5: invalid JSON" in attempt(bad)
    bad = list(lines)
    row = json.loads(bad[9]); del row["answerKey"]; bad[9] = json.dumps(row) + "\n"
    assert f"{f}:10: missing field 'answerKey'" in attempt(bad)
    bad = list(lines)
    row = json.loads(bad[2]); row["answerKey"] = "Z"; bad[2] = json.dumps(row) + "\n"
    assert f"{f}:3: answerKey 'Z'" in attempt(bad)
    bad = list(lines)
    bad[7] = bad[6]
    assert f"{f}:8: duplicate id" in attempt(bad)
    assert not (tmp_path / "d" / "arc_challenge" / "test.jsonl").exists()  # nothing written on error


def test_wrong_row_count_is_reported(tmp_path, offline):
    m = _mirror_with(tmp_path, "arc_challenge")
    f = m / "arc_challenge" / "test.jsonl"
    f.write_text("".join(f.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(T2EvalError) as ei:
        prepare_data(tmp_path / "d", mirror=m, datasets=["arc_challenge"])
    assert str(f) in str(ei.value) and "expected 1172, found 1171" in str(ei.value)


def test_mbppplus_version_from_name_or_count(tmp_path, offline):
    m = _mirror_with(tmp_path, "mbppplus")
    (m / "mbppplus" / "MbppPlus-v0.1.0.jsonl.gz").unlink()
    src = m / "mbppplus" / "MbppPlus-v0.2.0.jsonl.gz"
    # an unversioned release file: the version is inferred from its 378 rows
    src.rename(m / "mbppplus" / "MbppPlus.jsonl.gz")
    man = prepare_data(tmp_path / "d", mirror=m, datasets=["mbppplus"])
    assert set(man["datasets"]["mbppplus"]) == {"test-v0.2.0"}
    assert man["datasets"]["mbppplus"]["test-v0.2.0"]["version"] == "v0.2.0"
    # a file claiming v0.1.0 (399 problems) with 378 rows is a count error
    (m / "mbppplus" / "MbppPlus.jsonl.gz").rename(m / "mbppplus" / "MbppPlus-v0.1.0.jsonl.gz")
    with pytest.raises(T2EvalError, match="expected 399, found 378"):
        prepare_data(tmp_path / "d2", mirror=m, datasets=["mbppplus"])
    with pytest.raises(T2EvalError, match="no MbppPlus release v0.9.9"):
        prepare_data(tmp_path / "d3", mirror=m, datasets=["mbppplus"], mbppplus_version="v0.9.9")


def test_load_jsonl_missing_says_run_prepare_data(tmp_path):
    with pytest.raises(MissingDatasetError, match="t2eval prepare-data"):
        load_jsonl("gsm8k", "train", tmp_path)


def test_mirror_resolution_order(tmp_path, monkeypatch):
    a, b, c = (tmp_path / x for x in "abc")
    for p in (a, b, c):
        p.mkdir()
    monkeypatch.setenv("T2EVAL_DATA_MIRROR", str(b))
    assert resolve_mirror(a, c) == a
    assert resolve_mirror(None, c) == b
    monkeypatch.delenv("T2EVAL_DATA_MIRROR")
    assert resolve_mirror(None, c) == c
    assert resolve_mirror(None, None) is None
    with pytest.raises(T2EvalError, match="not a directory"):
        resolve_mirror(tmp_path / "nope")


# ------------------------------------------------------------------ splits

# under the OLD options (the data before the release-exact protocol)
EXPECTED_SPLITS = {
    "gsm8k": {"train": 3737, "valid": 3736, "test": 1319},
    "arc_easy": {"train": 1126, "valid": 1125, "test": 2376},
    "mbpp": {"train": 200, "valid": 100, "test": 78},
    "math": {"test": 5000, "fewshot_heldout": 10, "fewshot_test": 4990},
    "humaneval": {"test": 164, "fewshot_heldout": 10, "fewshot_test": 154},
    "arc_challenge": {"test": 1172, "fewshot_heldout": 10, "fewshot_test": 1162},
    # per source: n//5 test, the rest in the pool split even/odd
    "cls": {"train": 160 + 152 + 160, "valid": 160 + 151 + 160, "test": 79 + 75 + 79},
    "cls_leakfree": {"train": 160 + 120 + 160, "valid": 160 + 120 + 160, "test": 79 + 60 + 79},
}
# the defaults = the code release (PROTOCOL §3, §8): MBPP+ v0.1.0 (399 → 99 test); classifier data
# 3 × 399 concatenated, i % 5 < 4 → pool of 958 → train 479 / valid 479 (even/odd), test 239
RELEASE_SPLITS = {**EXPECTED_SPLITS,
                  "mbpp": {"train": 200, "valid": 100, "test": 99},
                  "cls": {"train": 479, "valid": 479, "test": 239},
                  # 399 + 300 + 399 = 1098 concatenated: pool 879 → 440 / 439, test 219
                  "cls_leakfree": {"train": 440, "valid": 439, "test": 219}}
MODES = {"release": {}, "old": OLD}


@pytest.fixture(scope="module")
def splits_by_mode(prepared):
    return {mode: {t: {s: S.task_split(t, s, prepared, **opts) for s in S.splits_for(t)} for t in S.TASKS}
            for mode, opts in MODES.items()}


@pytest.fixture(scope="module")
def all_splits(splits_by_mode):
    return splits_by_mode["old"]


@pytest.fixture(scope="module")
def release_splits(splits_by_mode):
    return splits_by_mode["release"]


def test_split_sizes(prepared, all_splits, release_splits):
    for t, sizes in EXPECTED_SPLITS.items():
        assert {s: len(r) for s, r in all_splits[t].items()} == sizes, t
    sizes = S.split_sizes(prepared, tasks=("mbpp", "cls", "cls_leakfree"), **OLD)
    assert sizes["mbpp_version"] == "v0.2.0" == S.mbpp_version(prepared, "v0.2.0")
    assert sizes["cls_per_source"] == {"math<-gsm8k": 399, "code<-mbpp": 378, "reasoning<-arc_challenge": 399}
    assert "| gsm8k | 3737 | 3736 | 1319 |" in S.summary(prepared, **OLD)
    # release defaults
    for t, sizes in RELEASE_SPLITS.items():
        assert {s: len(r) for s, r in release_splits[t].items()} == sizes, t
    sizes = S.split_sizes(prepared, tasks=("mbpp", "cls"))
    assert sizes["mbpp_version"] == "v0.1.0" == S.mbpp_version(prepared)
    assert sizes["cls_per_source"] == {"math<-gsm8k": 399, "code<-mbpp": 399, "reasoning<-arc_challenge": 399}
    note = S.summary(prepared)
    assert "| mbpp | 200 | 100 | 99 |" in note and "| cls | 479 | 479 | 239 |" in note
    assert "math 27, humaneval 16, arc_challenge 38" in note


def test_split_determinism_and_known_ids(prepared, all_splits):
    for t in ("mbpp", "humaneval", "cls"):
        for s in S.splits_for(t):
            assert [r["doc_id"] for r in S.task_split(t, s, prepared, **OLD)] == [r["doc_id"] for r in all_splits[t][s]]
    ids = lambda t, s, k=3: [r["doc_id"] for r in all_splits[t][s][:k]]  # noqa: E731
    assert ids("gsm8k", "train") == ["gsm8k/train/0", "gsm8k/train/2", "gsm8k/train/4"]
    assert ids("gsm8k", "valid") == ["gsm8k/train/1", "gsm8k/train/3", "gsm8k/train/5"]
    assert ids("arc_easy", "train") == ["Mercury_7220990", "Mercury_SC_401169", "NYSEDREGENTS_2006_8_10"]
    assert ids("mbpp", "train") == ["Mbpp/237", "Mbpp/131", "Mbpp/629"]
    assert ids("mbpp", "valid") == ["Mbpp/471", "Mbpp/67", "Mbpp/455"]
    assert ids("mbpp", "test", 1) == ["Mbpp/641"]
    assert ids("humaneval", "fewshot_heldout") == ["HumanEval/152", "HumanEval/75", "HumanEval/158"]
    assert ids("arc_challenge", "fewshot_heldout", 1) == ["NCEOGA_2013_8_26"]
    assert ids("math", "fewshot_heldout", 1) == ["test/geometry/302.json"]
    assert ids("cls", "test") == ["gsm8k/test/4", "gsm8k/test/9", "gsm8k/test/14"]
    # the MBPP shuffle is exactly random.Random(16) over the first 300 listed problems
    for opts, splits in ((OLD, all_splits), ({}, None)):
        version = opts.get("mbppplus_version", "v0.1.0")
        listed = [r["task_id"] for r in load_jsonl("mbppplus", f"test-{version}", prepared)]
        idx = list(range(300))
        random.Random(16).shuffle(idx)
        got = {s: [r["doc_id"] for r in S.task_split("mbpp", s, prepared, **opts)] for s in S.BASE_SPLITS}
        assert got["train"] == [listed[i] for i in idx[:200]]
        assert got["valid"] == [listed[i] for i in idx[200:]]
        assert got["test"] == listed[300:]
    # rows are fresh copies carrying the source fields
    row = all_splits["gsm8k"]["test"][17]
    assert row["doc_id"] == "gsm8k/test/17" and row["question"] == load_jsonl("gsm8k", "test", prepared)[17]["question"]
    row["question"] = "mutated"
    assert S.task_split("gsm8k", "test", prepared)[17]["question"] != "mutated"


@pytest.mark.parametrize("mode", list(MODES))
def test_train_valid_test_disjoint(splits_by_mode, mode):
    all_splits = splits_by_mode[mode]
    for t in S.TRAINING_TASKS + S.CLS_TASKS:
        parts = {s: [r["doc_id"] for r in all_splits[t][s]] for s in S.BASE_SPLITS}
        for s, d in parts.items():
            assert len(d) == len(set(d)), (t, s)
        assert not set(parts["train"]) & set(parts["valid"])
        assert not set(parts["train"]) & set(parts["test"])
        assert not set(parts["valid"]) & set(parts["test"])
    # gsm8k train/valid partition the whole GSM8K train set; mbpp covers all MBPP+ problems
    assert len(all_splits["gsm8k"]["train"]) + len(all_splits["gsm8k"]["valid"]) == 7473
    assert len({r["doc_id"] for s in S.BASE_SPLITS for r in all_splits["mbpp"][s]}) == \
        {"old": 378, "release": 399}[mode]


@pytest.mark.parametrize("mode", list(MODES))
def test_fewshot_heldout_excluded(splits_by_mode, mode):
    all_splits = splits_by_mode[mode]
    for t in S.UNSEEN_TASKS:
        held = {r["doc_id"] for r in all_splits[t]["fewshot_heldout"]}
        rest = [r["doc_id"] for r in all_splits[t]["fewshot_test"]]
        assert len(held) == 10 and not held & set(rest)
        assert held | set(rest) == {r["doc_id"] for r in all_splits[t]["test"]}
    held, rest = S.fewshot_partition(list(range(20)), n=10, seed=27)
    order = list(range(20))
    random.Random(27).shuffle(order)
    assert held == order[:10] and rest == sorted(order[10:])


def test_fewshot_seeds_and_math_order(prepared, release_splits):
    """Release: seeds 27 MATH / 38 ARC-Challenge / 16 HumanEval, written as the release does
    (random.seed(s); shuffle(list(range(n)))), over MATH in Hugging Face order (sorted unique_id)."""
    assert {t: S.fewshot_seed(t) for t in S.UNSEEN_TASKS} == {"math": 27, "arc_challenge": 38, "humaneval": 16}
    assert {t: S.fewshot_seed(t, "uniform") for t in S.UNSEEN_TASKS} == {t: 27 for t in S.UNSEEN_TASKS}
    hf_order = (MIRROR / "math" / "test_hf_order.txt").read_text().split()
    assert [r["doc_id"] for r in release_splits["math"]["test"]] == hf_order
    assert [r["doc_id"] for r in S.task_split("math", "test", prepared, math_order="mirror")] == \
        [r["unique_id"] for r in load_jsonl("math", "test", prepared)] != hf_order
    for task, seed in (("math", 27), ("arc_challenge", 38), ("humaneval", 16)):
        ids = [r["doc_id"] for r in release_splits[task]["test"]]
        random.seed(seed)
        idx = list(range(len(ids)))
        random.shuffle(idx)
        assert [r["doc_id"] for r in release_splits[task]["fewshot_heldout"]] == [ids[i] for i in idx[:10]]
        assert [r["doc_id"] for r in release_splits[task]["fewshot_test"]] == [ids[i] for i in sorted(idx[10:])]
    # the old seed-27-everywhere held-out sets differ from the release's for ARC-Challenge and HumanEval
    for t in ("arc_challenge", "humaneval"):
        assert [r["doc_id"] for r in release_splits[t]["fewshot_heldout"]] != \
            [r["doc_id"] for r in S.task_split(t, "fewshot_heldout", prepared, fewshot_seeds="uniform")]


def test_cls_balance_and_proportions(all_splits):
    for variant, per_source in (("cls", CLS_N), ("cls_leakfree", CLS_LEAKFREE_N)):
        rows = all_splits[variant]
        for label, n in per_source.items():
            k = {s: sum(r["label"] == label for r in rows[s]) for s in S.BASE_SPLITS}
            pool = n - n // 5
            assert k == {"train": (pool + 1) // 2, "valid": pool // 2, "test": n // 5}, (variant, label)
            assert abs(pool / (n // 5) - 4) < 0.1  # 4:1
        for r in rows["train"] + rows["test"]:
            assert r["label"] in S.CLS_LABELS and r["question"].strip() and r["source_task"]
    arc = next(r for r in all_splits["cls"]["train"] if r["label"] == "reasoning")
    assert arc["source_task"] == "arc_challenge" and "\nOptions:\nA. " in arc["question"]
    assert arc["source_question"] in arc["question"]
    code = next(r for r in all_splits["cls"]["train"] if r["label"] == "code")
    assert code["source_task"] == "mbpp" and "assert" in code["question"] and '"""' not in code["question"]


def test_cls_release_concatenated_split(prepared, release_splits):
    """PROTOCOL §8: GSM8K-test, MBPP+ (v0.1.0 instruction text), ARC-Challenge-test, 399 each,
    concatenated; i % 5 < 4 over the concatenated list → pool (958) → even/odd train 479 / valid 479;
    the rest test 239. Recomputed here independently of the splits module."""
    from t2eval.tasks.code import mbpp_instruction

    gsm = load_jsonl("gsm8k", "test", prepared)[:399]
    mbpp = load_jsonl("mbppplus", "test-v0.1.0", prepared)[:399]
    arc = load_jsonl("arc_challenge", "test", prepared)[:399]
    items = ([("math", r["question"]) for r in gsm] + [("code", mbpp_instruction(r["prompt"])) for r in mbpp]
             + [("reasoning", r["question"]) for r in arc])
    assert len(items) == 1197
    pool = [x for i, x in enumerate(items) if i % 5 < 4]
    want = {"train": pool[0::2], "valid": pool[1::2], "test": [x for i, x in enumerate(items) if i % 5 == 4]}
    assert (len(pool), len(want["train"]), len(want["valid"]), len(want["test"])) == (958, 479, 479, 239)
    rows = release_splits["cls"]
    for s in S.BASE_SPLITS:
        got = [(r["label"], r.get("source_question", r["question"])) for r in rows[s]]
        assert got == want[s], s
    code = next(r for r in rows["train"] if r["label"] == "code")
    assert code["question"].endswith("```") and " Your code should satisfy the following assertion:\n```python\n" \
        in code["question"]
    # the concatenated split is not per-source balanced: the label counts of its test part
    assert [sum(r["label"] == lab for r in rows["test"]) for lab in S.CLS_LABELS] == [79, 80, 80]


@pytest.mark.parametrize("mode", list(MODES))
def test_leakfree_cls_shares_no_test_question(splits_by_mode, mode):
    all_splits = splits_by_mode[mode]
    test_questions: set[str] = set()
    test_ids: set[str] = set()
    for t in S.TRAINING_TASKS + S.UNSEEN_TASKS:
        for r in all_splits[t]["test"]:
            test_ids.add(r["doc_id"])
            test_questions.add(_norm(r.get("question") or r.get("problem") or r.get("prompt")))
    leak = all_splits["cls_leakfree"]
    for s in S.BASE_SPLITS:
        for r in leak[s]:
            raw = r.get("source_question") or (r["prompt"] if r["source_task"] == "mbpp" else r["question"])
            assert r["doc_id"] not in test_ids, r["doc_id"]
            assert _norm(raw) not in test_questions, r["doc_id"]
    # ARC-Easy train item 192 repeats an ARC-Easy test stem: it is skipped, the next one taken instead
    reasoning = [r["doc_id"] for s in S.BASE_SPLITS for r in leak[s] if r["label"] == "reasoning"]
    assert "NYSEDREGENTS_2009_4_25" not in reasoning and len(reasoning) == 399
    # the code release's cls does draw from test sets (that is why the leak-free variant exists)
    assert any(r["doc_id"] in test_ids for s in S.BASE_SPLITS for r in all_splits["cls"][s])


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def test_unknown_task_or_split(prepared):
    with pytest.raises(T2EvalError, match="choose from test, fewshot_heldout"):
        S.task_split("math", "train", prepared)
    with pytest.raises(T2EvalError, match="unknown task"):
        S.task_split("gsm9k", "test", prepared)
    assert len(S.task_split("math", "test", prepared, math_test="math500")) == 500
    assert [r["doc_id"] for r in S.task_split("humaneval", "test", prepared, humaneval_dataset="humanevalplus")] \
        == [r["doc_id"] for r in S.task_split("humaneval", "test", prepared)]
    assert set(SPECS) == set(EXPECTED_ROWS)
    # an unknown task never falls through to another task's rows
    with pytest.raises(T2EvalError, match="'gsm8k' is not an unseen task"):
        S._unseen_test("gsm8k", prepared, S.resolve_options())
    with pytest.raises(T2EvalError, match="unknown data option.*mbpp_version"):
        S.task_split("mbpp", "test", prepared, mbpp_version="v0.1.0")
    with pytest.raises(T2EvalError, match="math_order='sorted' is not one of hf, mirror"):
        S.task_split("math", "test", prepared, math_order="sorted")


def test_offline_uses_evalplus_cache(tmp_path):
    """With HF_HUB_OFFLINE=1 and no mirror, MBPP+ still comes from evalplus's own download cache."""
    import subprocess
    import sys

    cache = tmp_path / "xdg" / "evalplus"
    cache.mkdir(parents=True)
    with gzip.open(MIRROR / "mbppplus" / "MbppPlus-v0.2.0.jsonl.gz", "rb") as f:
        (cache / "MbppPlus-v0.2.0.jsonl").write_bytes(f.read())
    env = {k: v for k, v in os.environ.items() if k != "T2EVAL_DATA_MIRROR"}
    env.update(HF_HUB_OFFLINE="1", XDG_CACHE_HOME=str(tmp_path / "xdg"))
    r = subprocess.run([sys.executable, "-m", "t2eval.cli", "prepare-data", "--out", str(tmp_path / "d"),
                        "--datasets", "mbppplus"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    e = manifest(tmp_path / "d")["datasets"]["mbppplus"]["test-v0.2.0"]
    assert e["source"].startswith("evalplus:mbppplus v0.2.0") and e["rows"] == 378 and e["version"] == "v0.2.0"


# ------------------------------------------------------------------ release data (PROTOCOL §8)

def test_arc_challenge_original_labels_restored(prepared):
    """prepare-data restores ARC-Challenge's original labels/keys: 22 of 1172 keyed "1".."4", the
    correct choice unchanged; the label lists as SOURCES.md counts them."""
    rows = load_jsonl("arc_challenge", "test", prepared)
    norm = [json.loads(line) for line in open(MIRROR / "arc_challenge" / "test.jsonl")]
    numeric = [r["id"] for r in rows if r["answerKey"] in "12345"]
    assert len(numeric) == 22 and all(i.startswith("NYSEDREGENTS") for i in numeric)
    shapes = {}
    for r, n in zip(rows, norm):
        assert r["id"] == n["id"] and r["question"] == n["question"] and r["choices"]["text"] == n["choices"]["text"]
        assert r["choices"]["label"].index(r["answerKey"]) == n["choices"]["label"].index(n["answerKey"])
        shapes[r["choices"]["label"][0] + "-" + r["choices"]["label"][-1]] = \
            shapes.get(r["choices"]["label"][0] + "-" + r["choices"]["label"][-1], 0) + 1
    assert shapes == {"A-D": 1144, "1-4": 21, "A-C": 3, "1-3": 1, "A-E": 3}
    e = manifest(prepared)["datasets"]["arc_challenge"]["test"]
    assert "test_original_labels.jsonl" in e["source"]
    # ARC-Easy keeps its hub labels: 97 of 2376 test and 102 of 2251 train items are keyed "1".."4"
    assert sum(r["answerKey"] in "12345" for r in load_jsonl("arc_easy", "test", prepared)) == 97
    assert sum(r["answerKey"] in "12345" for r in load_jsonl("arc_easy", "train", prepared)) == 102


def test_arc_challenge_labels_file_required_and_checked(tmp_path, offline):
    m = _mirror_with(tmp_path, "arc_challenge")
    labels = m / "arc_challenge" / "test_original_labels.jsonl"
    lines = labels.read_text().splitlines(keepends=True)
    bad = list(lines)
    row = json.loads(bad[44]); row["answerKey"] = row["labels"][0] if row["answerKey"] != row["labels"][0] \
        else row["labels"][1]; bad[44] = json.dumps(row) + "\n"
    labels.write_text("".join(bad))
    with pytest.raises(T2EvalError, match=f"{labels}:45: answerKey"):
        prepare_data(tmp_path / "d", mirror=m, datasets=["arc_challenge"])
    labels.unlink()
    with pytest.raises(MissingDatasetError, match="test_original_labels.jsonl"):
        prepare_data(tmp_path / "d", mirror=m, datasets=["arc_challenge"])


def test_evalplus_versions_switch_without_redownload(tmp_path, offline):
    """Both releases are prepared from the mirror; a missing one is an error naming its file."""
    m = _mirror_with(tmp_path, "mbppplus")
    out = tmp_path / "d"
    prepare_data(out, mirror=m, datasets=["mbppplus"])
    assert len(S.task_split("mbpp", "test", out)) == 99
    assert len(S.task_split("mbpp", "test", out, mbppplus_version="v0.2.0")) == 78
    # only one release requested: the other entry is kept (merge), nothing else rewritten
    prepare_data(out, mirror=m, datasets=["mbppplus"], mbppplus_version="v0.2.0", force=True)
    assert set(manifest(out)["datasets"]["mbppplus"]) == {"test-v0.1.0", "test-v0.2.0"}
    # a data dir without the release version: clear error naming the file to add
    (m / "mbppplus" / "MbppPlus-v0.1.0.jsonl.gz").unlink()
    out2 = tmp_path / "d2"
    prepare_data(out2, mirror=m, datasets=["mbppplus"])
    with pytest.raises(MissingDatasetError) as ei:
        S.task_split("mbpp", "test", out2)
    assert str(out2 / "mbppplus" / "test-v0.1.0.jsonl") in str(ei.value) and "MbppPlus-v0.1.0.jsonl.gz" in str(ei.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingDatasetError, match="MbppPlus-v0.1.0.jsonl.gz"):
        prepare_data(tmp_path / "d3", mirror=empty, datasets=["mbppplus"], mbppplus_version="v0.1.0")
    with pytest.raises(T2EvalError, match="MbppPlus-v0.1.0.jsonl.gz"):
        prepare_data(tmp_path / "d4", mirror=m, datasets=["mbppplus"], mbppplus_version="v0.1.0")


# ------------------------------------------------------------------ integrity (issue 13.3)

def test_prepared_split_checked_against_manifest(prepared, tmp_path, caplog):
    out = tmp_path / "d"
    shutil.copytree(prepared, out)
    f = out / "gsm8k" / "test.jsonl"
    f.write_text("".join(f.read_text().splitlines(keepends=True)[:3]))  # a test split cut to 3 rows
    from t2eval.errors import CorruptArtifactError

    with pytest.raises(CorruptArtifactError) as ei:
        S.task_split("gsm8k", "test", out)
    msg = str(ei.value)
    assert str(f) in msg and "3 rows" in msg and "1319 rows" in msg and "prepare-data" in msg
    with pytest.raises(CorruptArtifactError):
        load_jsonl("gsm8k", "test", out)
    # same row count, edited content: the sha256 catches it
    g = out / "arc_easy" / "test.jsonl"
    g.write_text(g.read_text().replace('"answerKey": "A"', '"answerKey": "B"', 1))
    with pytest.raises(CorruptArtifactError, match="sha256"):
        S.task_split("arc_easy", "test", out)
    # a file the manifest does not know is refused too
    (out / "math" / "extra.jsonl").write_text('{"problem": "p", "solution": "s"}\n')
    with pytest.raises(MissingDatasetError, match="not recorded"):
        load_jsonl("math", "extra", out)
    # prepare-data repairs it
    prepare_data(out, mirror=MIRROR, datasets=["gsm8k", "arc_easy"])
    assert len(S.task_split("gsm8k", "test", out)) == 1319
    # a directory that prepare-data never wrote (no manifest.json at all) is read unchecked, with a warning
    raw = tmp_path / "raw"
    shutil.copytree(MIRROR / "arc_challenge", raw / "arc_challenge")
    with caplog.at_level("WARNING", logger="t2eval.data"):
        assert len(S.task_split("arc_challenge", "test", raw)) == 1172
    assert "no manifest.json" in caplog.text


def test_empty_prepared_split_is_a_clear_error(tmp_path, offline):
    """An empty split (recorded as such in the manifest) is a T2EvalError, not an IndexError."""
    from t2eval.data.datasets import update_manifest

    out = tmp_path / "d"
    (out / "humaneval").mkdir(parents=True)
    (out / "humaneval" / "test.jsonl").write_bytes(b"")
    update_manifest(out, "humaneval", {"test": {"path": "humaneval/test.jsonl", "rows": 0,
                                                 "sha256": hashlib.sha256(b"").hexdigest(),
                                                 "source": "test", "version": None}})
    with pytest.raises(T2EvalError, match="'humaneval' split 'test' is empty"):
        S.task_split("humaneval", "test", out)
    with pytest.raises(T2EvalError, match="needs at least 10 rows, got 0"):
        S.task_split("humaneval", "fewshot_heldout", out)


def _prepare_after_barrier(out, names, barrier):
    barrier.wait()
    prepare_data(out, mirror=MIRROR, datasets=names)


def test_concurrent_partial_prepare_keeps_every_entry(tmp_path):
    """Two prepare-data processes on disjoint subsets, started together: the manifest ends up with
    all of them (each update is locked and re-reads the manifest)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    out = tmp_path / "d"
    groups = [["gsm8k", "humaneval"], ["arc_challenge", "mbpp"]]
    for _ in range(2):
        barrier = ctx.Barrier(len(groups))
        procs = [ctx.Process(target=_prepare_after_barrier, args=(out, g, barrier)) for g in groups]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
            assert p.exitcode == 0
        assert set(manifest(out)["datasets"]) == {n for g in groups for n in g}
        shutil.rmtree(out)
