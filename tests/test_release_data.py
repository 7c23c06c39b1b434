"""Release fidelity of the data (PROTOCOL §3, §5, §8): the stock lm-eval tasks t2_* load exactly the
documents the paper's code release used, and ARC's numeric answer keys score as the release scores
them. Every expectation is recomputed here from the mirror's files, independently of t2eval.data.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import pytest

from t2eval.tasks import arc, get_task, lm_eval_task_dir

REPO = Path(__file__).resolve().parent.parent
MIRROR = Path(os.environ.get("T2EVAL_DATA_MIRROR") or REPO.parent / "shared" / "data")
pytestmark = pytest.mark.skipif(not (MIRROR / "arc_challenge" / "test_original_labels.jsonl").is_file(),
                                reason=f"dataset mirror with the release files not found at {MIRROR}")


def _jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _release_shuffle(n: int, seed: int) -> list[int]:
    """What the release writes: random.seed(s); idx = list(range(n)); random.shuffle(idx)."""
    state = random.getstate()
    try:
        random.seed(seed)
        idx = list(range(n))
        random.shuffle(idx)
        return idx
    finally:
        random.setstate(state)


# documents of the release, from the mirror's raw files
def _release_docs() -> dict[str, list[str]]:
    mbpp = [r["task_id"] for r in _jsonl(MIRROR / "mbppplus" / "MbppPlus-v0.1.0.jsonl.gz")]
    math_hf = sorted(r["unique_id"] for r in _jsonl(MIRROR / "math" / "test.jsonl"))  # HF = plain string order
    return {
        "gsm8k": [f"gsm8k/test/{i}" for i in range(len(_jsonl(MIRROR / "gsm8k" / "test.jsonl")))],
        "arc_easy": [r["id"] for r in _jsonl(MIRROR / "arc_easy" / "test.jsonl")],
        "arc_challenge": [r["id"] for r in _jsonl(MIRROR / "arc_challenge" / "test.jsonl")],
        "math": math_hf,
        "humaneval": [r["task_id"] for r in _jsonl(MIRROR / "humaneval" / "HumanEval.jsonl.gz")],
        "mbpp_all": mbpp,
    }


RELEASE_SEEDS = {"math": 27, "arc_challenge": 38, "humaneval": 16}
COUNTS = {  # lm-eval task -> documents in release mode
    "t2_gsm8k": 1319, "t2_gsm8k_train": 3737, "t2_gsm8k_valid": 3736,
    "t2_arc_easy": 2376, "t2_arc_easy_train": 1126, "t2_arc_easy_valid": 1125,
    "t2_arc_challenge": 1172, "t2_arc_challenge_fewshot_test": 1162,
    "t2_math": 5000, "t2_math_fewshot_test": 4990,
    "t2_humaneval": 164, "t2_humaneval_fewshot_test": 154,
    "t2_mbpp": 99, "t2_mbpp_train": 200, "t2_mbpp_valid": 100,
    "t2_cls": 239, "t2_cls_train": 479, "t2_cls_valid": 479,
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from t2eval.data.datasets import prepare_data

    d = tmp_path_factory.mktemp("data")
    prepare_data(d, mirror=MIRROR)
    return d


@pytest.fixture(scope="module")
def lm_eval_docs(data_dir):
    """{task name: [row]} for every t2_* YAML, loaded by lm-eval's TaskManager (stock path)."""
    from lm_eval.tasks import TaskManager

    mp = pytest.MonkeyPatch()
    mp.setenv("T2EVAL_DATA_DIR", str(data_dir))
    try:
        tm = TaskManager(include_path=str(lm_eval_task_dir()), include_defaults=False)
        from t2eval.constants import VLM_TASKS

        # the LLM tasks of the code release (the VQA tasks have no release: tests/test_vlm_eval.py)
        names = sorted(p.stem for p in lm_eval_task_dir().glob("t2_*.yaml")
                       if p.stem[3:] not in VLM_TASKS)
        tasks = tm.load(names)["tasks"]
        return {n: list(t.test_docs()) for n, t in tasks.items()}
    finally:
        mp.undo()


def test_every_t2_task_has_the_release_doc_count(lm_eval_docs):
    got = {n: len(d) for n, d in lm_eval_docs.items()}
    want = {**COUNTS, **{n + "_llama3": c for n, c in COUNTS.items() if n.startswith("t2_arc_")}}
    assert got == want


def test_t2_doc_identities_are_the_releases(lm_eval_docs):
    rel = _release_docs()
    ids = {n: [r["doc_id"] for r in d] for n, d in lm_eval_docs.items()}
    # MBPP-Pro: the 99 test problems are the last 99 of MBPP+ v0.1.0, in listed order; train+valid
    # are the first 300 shuffled with seed 16 (200 / 100)
    assert len(rel["mbpp_all"]) == 399
    assert ids["t2_mbpp"] == rel["mbpp_all"][-99:]
    order = list(range(300))
    random.Random(16).shuffle(order)
    assert ids["t2_mbpp_train"] == [rel["mbpp_all"][i] for i in order[:200]]
    assert ids["t2_mbpp_valid"] == [rel["mbpp_all"][i] for i in order[200:]]
    # full test sets: the release's documents (MATH in Hugging Face order)
    assert ids["t2_gsm8k"] == rel["gsm8k"]
    assert ids["t2_arc_easy"] == ids["t2_arc_easy_llama3"] == rel["arc_easy"]
    assert ids["t2_arc_challenge"] == rel["arc_challenge"]
    assert ids["t2_math"] == rel["math"] == (MIRROR / "math" / "test_hf_order.txt").read_text().split()
    assert ids["t2_humaneval"] == rel["humaneval"]
    # few-shot reported sets = the release's shuffle minus its first 10, per task seed
    for task, seed in RELEASE_SEEDS.items():
        full = rel[task]
        idx = _release_shuffle(len(full), seed)
        reported = ids[f"t2_{task}_fewshot_test"]
        assert len(reported) == len(full) - 10
        assert set(reported) == {full[i] for i in idx[10:]}, task
        assert not set(reported) & {full[i] for i in idx[:10]}
    assert set(ids["t2_arc_challenge_fewshot_test_llama3"]) == set(ids["t2_arc_challenge_fewshot_test"])


def test_t2_cls_is_the_release_concatenation(lm_eval_docs):
    rel = _release_docs()
    gsm, mbpp = rel["gsm8k"][:399], rel["mbpp_all"][:399]
    arcc = rel["arc_challenge"][:399]
    items = gsm + mbpp + arcc
    pool = [x for i, x in enumerate(items) if i % 5 < 4]
    ids = {n: [r["doc_id"] for r in lm_eval_docs[n]] for n in ("t2_cls", "t2_cls_train", "t2_cls_valid")}
    assert ids["t2_cls_train"] == pool[0::2] and ids["t2_cls_valid"] == pool[1::2]
    assert ids["t2_cls"] == [x for i, x in enumerate(items) if i % 5 == 4]
    # code questions are the MBPP instruction the dispatcher sees
    code = [json.loads(r["t2_doc"]) for r in lm_eval_docs["t2_cls_train"]]
    code = [d for d in code if d["label"] == "code"]
    assert code and all(d["question"] == get_task("mbpp").user_message(d) for d in code)


# ----------------------------------------------------------------------------- ARC numeric keys

def _perfect(docs: list[dict]) -> list[str]:
    """Completions that name the right option by position (what a perfect model writes)."""
    return [f"the answer is ({arc.LETTERS[d['choices']['label'].index(d['answerKey'])]})" for d in docs]


def test_arc_numeric_keys_release_vs_corrected(data_dir):
    """Release: an item keyed "1".."4" is never right, because the extracted letter is compared with
    the raw key -- 97 of 2376 ARC-Easy test items, 102 of the 2251 train items the RL reward sees,
    22 of 1172 ARC-Challenge test items (original labels restored). Corrected: all right."""
    want = {("arc_easy", ("test",)): (2376, 97), ("arc_easy", ("train", "valid")): (2251, 102),
            ("arc_challenge", ("test",)): (1172, 22)}
    for (key, splits), (n, numeric) in want.items():
        release, corrected = get_task(key), get_task(key, numeric_keys="corrected")
        assert release.numeric_keys == "release"
        docs = [d for s in splits for d in release.docs(s, data_dir)]
        assert len(docs) == n
        assert sum(release.score_batch(docs, _perfect(docs))) == n - numeric, (key, splits)
        assert sum(corrected.score_batch(docs, _perfect(docs))) == n, (key, splits)
        # the numeric items answered with their raw key can't be extracted either: still wrong
        num = [d for d in docs if d["answerKey"] in "12345"]
        assert len(num) == numeric
        assert not any(release.score_batch(num, [f"the answer is ({d['answerKey']})" for d in num]))


def test_arc_numeric_keys_through_lm_eval(lm_eval_docs):
    """The lm-eval scorer hook (process_results) gives the same counts on the ARC-Challenge docs."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("t2_utils", lm_eval_task_dir() / "t2_utils.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = lm_eval_docs["t2_arc_challenge"]
    docs = [json.loads(r["t2_doc"]) for r in rows]
    scores = [mod.process_results(r, [c])["acc"] for r, c in zip(rows, _perfect(docs))]
    assert sum(scores) == 1172 - 22


def test_arc_numeric_key_options():
    doc = {"question": "Q?", "answerKey": "2", "choices": {"text": ["w", "x", "y", "z"], "label": ["1", "2", "3", "4"]}}
    assert arc.gold_letter(doc) == "2" and arc.gold_letter(doc, "corrected") == "B"
    assert get_task("arc_easy").score_one(doc, "the answer is (B)") is False
    assert get_task("arc_easy", numeric_keys="corrected").score_one(doc, "the answer is (B)") is True
    # the older option names stay accepted
    assert get_task("arc_easy", numeric_keys="position").numeric_keys == "corrected"
    assert get_task("arc_easy", numeric_keys="code").numeric_keys == "release"
    from t2eval.errors import T2EvalError

    with pytest.raises(T2EvalError, match="numeric_keys"):
        get_task("arc_easy", numeric_keys="letters")
    # the LoRA target is always the right letter
    assert get_task("arc_easy").reference(doc) == "the answer is (B)"
