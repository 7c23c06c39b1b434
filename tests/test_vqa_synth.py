"""t2eval.data.synth_textvqa: deterministic generated text-in-image VQA items."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from t2eval.data import synth_textvqa as G
from t2eval.errors import T2EvalError
from t2eval.tasks.vqa import normalise_answer, vqa_accuracy

SIZES = {"train": 24, "valid": 4, "test": 8}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, G.generate(out, SIZES, seed=0)


def _rows(d, split):
    return [json.loads(x) for x in (d / f"{split}.jsonl").read_text().splitlines()]


def test_deterministic_same_seed_same_bytes(generated, tmp_path):
    out, info = generated
    again = G.generate(tmp_path / "again", SIZES, seed=0)
    assert again["files"] == info["files"]  # identical jsonl bytes
    for split in SIZES:
        assert (out / f"{split}.jsonl").read_bytes() == (tmp_path / "again" / f"{split}.jsonl").read_bytes()
    imgs = sorted(p.name for p in (out / "images").iterdir())
    assert imgs == sorted(p.name for p in (tmp_path / "again" / "images").iterdir())
    assert all((out / "images" / n).read_bytes() == (tmp_path / "again" / "images" / n).read_bytes() for n in imgs)
    other = G.generate(tmp_path / "other", {"test": 8}, seed=1)
    assert other["files"]["test.jsonl"] != info["files"]["test.jsonl"]
    # item i depends on (seed, split, i) only: a smaller split is a prefix of a larger one
    assert _rows(out, "train")[:5] == [G.generate_item("train", i, 0)[0] for i in range(5)]
    assert info["version"] == G.GENERATOR_VERSION and info["pillow"] == Image.__version__ and info["seed"] == 0


def test_rows_answers_ocr_and_images(generated):
    out, _ = generated
    G.validate(out, SIZES)
    kinds = set()
    for split in SIZES:
        rows = _rows(out, split)
        assert len(rows) == SIZES[split] and len({r["question_id"] for r in rows}) == len(rows)
        for r in rows:
            assert set(r) >= {"question_id", "question", "image", "answers", "ocr_tokens"}
            assert len(r["answers"]) == 10 and r["question"].endswith("?")
            # the answer is readable: its normalised words are among the normalised OCR tokens
            ocr = {normalise_answer(t) for t in r["ocr_tokens"]}
            assert all(normalise_answer(w) in ocr for w in r["answer"].split()), r
            assert vqa_accuracy(r["answer"], r["answers"]) == 1.0  # ≥ 8 annotators agree after normalisation
            assert len(r["ocr_tokens"]) > len(r["answer"].split())  # distractors are rendered too
            im = Image.open(io.BytesIO((out / r["image"]).read_bytes()))
            im.load()
            assert im.mode == "RGB" and im.size[0] >= 112
            kinds.add(r["kind"])
    assert kinds == set(G.KINDS)
    # the variants are not all identical strings: normalisation matters
    assert any(len(set(r["answers"])) > 1 for r in _rows(out, "train"))


def test_validate_catches_broken_data(generated, tmp_path):
    import shutil

    out, _ = generated
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    with pytest.raises(T2EvalError, match="rows"):
        G.validate(bad, {"test": 9})
    row = _rows(bad, "test")[0]
    (bad / row["image"]).write_bytes(b"not a png")
    with pytest.raises(T2EvalError, match="content its name addresses"):
        G.validate(bad, {"test": 8})
    with pytest.raises(T2EvalError, match="split"):
        G.generate_item("dev", 0)
