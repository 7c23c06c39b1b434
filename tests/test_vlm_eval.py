"""The VLM data and evaluation path (issue 10): prepare-data for the VQA sets, the VQA tasks, and the `t2`
model in multimodal mode (tiny-llava-next, HF backend) writing VQA-accuracy cells."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from t2eval.errors import CorruptArtifactError, MissingDatasetError, T2EvalError

SIZES = "train=6,valid=4,test=5"


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    from t2eval.cli import main

    out = tmp_path_factory.mktemp("vlm-data") / "data"
    assert main(["prepare-data", "--out", str(out), "--datasets", "synth_textvqa",
                 "--synth-textvqa-sizes", SIZES]) == 0
    return out


def _expert(svd_path: str, root: Path, kind: str) -> str:
    """An SVF expert: constant z (W′ = W under the code parameterisation) or a seeded random one."""
    from t2eval.svd import load_svd
    from t2eval.svf import ExpertVector

    svd = load_svd(svd_path)
    g = torch.Generator().manual_seed(7)
    z = {n: torch.full((svd.rank(n),), 0.3) if kind == "const" else 3.0 * torch.randn(svd.rank(n), generator=g)
         for n in svd.names}
    p = root / kind / "z.safetensors"
    ExpertVector.from_svd(z, svd, param="code", task="synth_textvqa").save(p)
    return str(p.parent)


@pytest.fixture(scope="module")
def experts(vlm_svd, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("vlm-experts")
    return {k: _expert(vlm_svd, root, k) for k in ("const", "random")}


# --------------------------------------------------------------------------- data

def test_prepare_synth_textvqa_deterministic_validated_and_repaired(synth_data, tmp_path):
    from t2eval.data import load_jsonl, manifest
    from t2eval.data.datasets import prepare_data
    from t2eval.data.synth_textvqa import GENERATOR_VERSION
    from t2eval.tasks import get_task

    man = manifest(synth_data)["datasets"]["synth_textvqa"]
    assert {s: e["rows"] for s, e in man.items()} == {"train": 6, "valid": 4, "test": 5}
    gen = man["test"]["generator"]
    assert gen["version"] == GENERATOR_VERSION and gen["pillow"] == Image.__version__ and gen["seed"] == 0
    again = prepare_data(tmp_path / "again", datasets=["synth_textvqa"], synth_textvqa_sizes=SIZES)
    assert {s: e["sha256"] for s, e in again["datasets"]["synth_textvqa"].items()} == \
        {s: e["sha256"] for s, e in man.items()}  # same seed, same bytes
    other = prepare_data(tmp_path / "other", datasets=["synth_textvqa"], synth_textvqa_sizes=SIZES, synth_textvqa_seed=1)
    assert other["datasets"]["synth_textvqa"]["test"]["sha256"] != man["test"]["sha256"]
    rows = load_jsonl("synth_textvqa", "test", synth_data)  # checked against the manifest
    assert all(len(r["answers"]) == 10 and r["image"].startswith("images/") for r in rows)

    # a prepared image that was changed: a clear error when a task opens it, and prepare-data repairs it
    d = tmp_path / "again"
    task = get_task("synth_textvqa")
    doc = task.docs("test", d)[0]
    good = Path(doc["image_path"]).read_bytes()
    Path(doc["image_path"]).write_bytes(good[:100])
    with pytest.raises(CorruptArtifactError, match="prepare-data"):
        task.image(doc)
    prepare_data(d, datasets=["synth_textvqa"], synth_textvqa_sizes=SIZES)  # not up to date any more: rebuilt
    assert Path(doc["image_path"]).read_bytes() == good and task.image(doc).mode == "RGB"
    # other sizes than the manifest's are a new run, not "up to date"
    m = prepare_data(d, datasets=["synth_textvqa"], synth_textvqa_sizes="train=2,valid=1,test=3")
    assert m["datasets"]["synth_textvqa"]["test"]["rows"] == 3
    with pytest.raises(T2EvalError, match="sizes"):
        prepare_data(d, datasets=["synth_textvqa"], synth_textvqa_sizes="dev=3")


def _png(color, size=(40, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)


def _hub_row(i: int, answers=None, image=None) -> dict:
    """A row as the hub's parquet holds it (image = {"bytes", "path"} struct)."""
    return {"question_id": 1000 + i, "image_id": f"img{i}", "question": f"what is written on sign {i}?",
            "answers": answers or [f"word{i}"] * 8 + ["other", "x"], "ocr_tokens": [f"word{i}", "sale"],
            "image": {"bytes": image if image is not None else _png((10 * i, 80, 200)), "path": f"{i}.png"},
            "set_name": "train"}


def test_parquet_mirror_reader_and_textvqa_splits(tiny_vlm, tmp_path, monkeypatch):
    from t2eval.data import vqa_data
    from t2eval.data.datasets import DATASETS, prepare_data
    from t2eval.data.splits import task_split

    assert not set(vqa_data.VQA_DATASETS) & set(DATASETS)  # a default prepare-data run stays the LLM datasets
    mirror = tmp_path / "mirror"
    _write_parquet(mirror / "textvqa/data/train-00000-of-00002.parquet", [_hub_row(i) for i in range(3)])
    _write_parquet(mirror / "textvqa/data/train-00001-of-00002.parquet", [_hub_row(i) for i in range(3, 5)])
    _write_parquet(mirror / "textvqa/data/validation-00000-of-00001.parquet", [_hub_row(i) for i in range(5, 8)])
    files = vqa_data.parquet_files(mirror, "textvqa", "train")
    assert [f.name for f in files] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    rows = vqa_data.read_split(vqa_data.read_parquet(files), tmp_path / "split")
    assert [r["question_id"] for r in rows] == [1000, 1001, 1002, 1003, 1004]
    assert set(rows[0]) == {"question_id", "question", "image", "answers", "ocr_tokens", "image_id"}
    img = tmp_path / "split" / rows[1]["image"]
    assert img.read_bytes() == _png((10, 80, 200)) and img.name.endswith(".png")
    assert vqa_data.load_image(img).size == (40, 24)

    # the real counts are checked: a 5-row "TextVQA train" is a clear error naming the source
    out = tmp_path / "data"
    with pytest.raises(T2EvalError, match=r"wrong row count for textvqa/train: expected 34602, found 5"):
        prepare_data(out, mirror=mirror, datasets=["textvqa"])
    monkeypatch.setitem(vqa_data.COUNTS, "textvqa", {"train": 5, "test": 3})
    man = prepare_data(out, mirror=mirror, datasets=["textvqa"])["datasets"]["textvqa"]
    assert {s: (e["rows"], e["images"]) for s, e in man.items()} == {"train": (5, 5), "test": (3, 3)}
    assert man["test"]["source"].startswith("mirror:") and "validation-*.parquet" in man["test"]["source"]
    # train/valid = even/odd of TextVQA train; test = its validation split; doc_id = question_id
    assert [r["doc_id"] for r in task_split("textvqa", "train", out)] == ["1000", "1002", "1004"]
    assert [r["doc_id"] for r in task_split("textvqa", "valid", out)] == ["1001", "1003"]
    test = task_split("textvqa", "test", out)
    assert [r["doc_id"] for r in test] == ["1005", "1006", "1007"] and Path(test[0]["image_path"]).is_file()

    # the textvqa task end to end on the fixture: t2 multimodal, OCR tokens off by default for textvqa
    from t2eval.evaluate import evaluate

    cell_path = tmp_path / "raw/tiny-llava-next/base/textvqa.json"
    cell = evaluate(str(tiny_vlm), "base", "textvqa", cell_path, data_dir=str(out), limit=2)
    assert cell["metric"] == "vqa_acc" and cell["total"] == 2 and cell["provenance"]["config"]["task_options"] == {}
    assert all("OCR tokens" not in json.dumps(s["arguments"]) for s in _samples(cell_path))
    assert {"manifest.json", "textvqa/train", "textvqa/test"} <= set(cell["provenance"]["data"])  # data hashed

    # bad rows name the file and row
    _write_parquet(mirror / "okvqa/data/val2014-00000-of-00001.parquet",
                   [_hub_row(0), _hub_row(1, answers=["a"] * 9)])
    with pytest.raises(T2EvalError, match=r"val2014-00000-of-00001.parquet row 1: field 'answers' must be the 10"):
        prepare_data(out, mirror=mirror, datasets=["okvqa"])
    _write_parquet(mirror / "okvqa/data/val2014-00000-of-00001.parquet", [_hub_row(0, image=b"\x89PNG\r\n\x1a\nbroken")])
    with pytest.raises(T2EvalError, match="row 0: the image does not decode"):
        prepare_data(out, mirror=mirror, datasets=["okvqa"])
    # no mirror files and the hub disabled: both remedies named
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingDatasetError, match=r"okvqa/data/val2014-\*.parquet.*\n.*\n.*lmms-lab/OK-VQA"):
        prepare_data(out, mirror=tmp_path / "mirror" / "textvqa", datasets=["okvqa"])


# --------------------------------------------------------------------------- tasks

def test_vqa_task_prompt_scoring_and_reward(tiny_vlm):
    from transformers import AutoTokenizer

    from t2eval.constants import EVAL_TASKS, METRIC_OF_TASK, TRAIN_TASKS, UNSEEN_TASKS, VLM_TASKS
    from t2eval.tasks import get_task, known_tasks

    assert set(VLM_TASKS) <= set(known_tasks()) and not set(VLM_TASKS) & set(EVAL_TASKS + TRAIN_TASKS + UNSEEN_TASKS)
    doc = {"doc_id": "1", "question": "What is the price?", "ocr_tokens": ["Tea", "$4.20", "SALE"],
           "answers": ["$4.20"] * 3 + ["4.20"] * 2 + ["the $4.20"] + ["tea"] * 3 + ["sale"]}
    synth, text, ok = get_task("synth_textvqa"), get_task("textvqa"), get_task("okvqa")
    assert synth.options["ocr_in_prompt"] and not text.options["ocr_in_prompt"] and not ok.ocr_in_prompt
    assert synth.user_message(doc) == ("<image>\nWhat is the price?\nOCR tokens: Tea, $4.20, SALE\n"
                                       "Answer the question using a single word or phrase.")
    assert text.user_message(doc) == "<image>\nWhat is the price?\nAnswer the question using a single word or phrase."
    assert get_task("textvqa", ocr_in_prompt="true").user_message(doc) == synth.user_message(doc)
    assert get_task("synth_textvqa", ocr_in_prompt=False).user_message(doc) == text.user_message(doc)
    tok = AutoTokenizer.from_pretrained(tiny_vlm)
    p = synth.prompt(tok, doc)
    assert p.count("<image>") == 1 and p.endswith("<|im_start|>assistant\n")
    assert synth.metric == METRIC_OF_TASK["synth_textvqa"] == "vqa_acc"
    assert synth.gen_kwargs == {"max_new_tokens": 16, "stop": ["\n"]}
    # VQA accuracy of the completion's first line: 4 matches of "$4.20" after EvalAI normalisation -> 1
    comps = [" $4.20\nmore text", "tea", "sale", "coffee", "", "The $4.20."]
    accs = synth.accuracy_batch([doc] * len(comps), comps)
    assert [round(a, 4) for a in accs] == [1.0, 0.9, 0.3, 0.0, 0.0, 1.0]
    assert synth.score_batch([doc] * len(comps), comps) == [a > 0 for a in accs]
    assert [synth.reward(doc, c) for c in ("tea", "coffee")] == [1.0, -0.1]
    assert get_task("synth_textvqa", reward="soft").reward(doc, "tea") == pytest.approx(0.9)
    from t2eval.cli import subcommand_parser
    from t2eval.evaluate import parse_task_options

    args = subcommand_parser("evaluate").parse_args(["--model", "m", "--method", "base", "--task", "okvqa", "--out",
                                                     "o.json", "--task-options", '{"ocr_in_prompt": false}'])
    assert parse_task_options(args.task_options) == {"ocr_in_prompt": False}
    with pytest.raises(T2EvalError, match="JSON object"):
        parse_task_options("[1]")
    assert synth.reference(doc) in ("$4.20", "tea")
    with pytest.raises(T2EvalError, match="normalise"):
        get_task("textvqa", normalise="lower")
    with pytest.raises(T2EvalError, match="ocr_in_prompt"):
        get_task("textvqa", ocr_in_prompt="maybe")


# --------------------------------------------------------------------------- the t2 model, multimodal

def _samples(cell_path: Path) -> list[dict]:
    side = cell_path.with_name(cell_path.stem + ".lm_eval") / "samples.jsonl"
    return [json.loads(x) for x in side.read_text().splitlines()]


def test_t2_multimodal_evaluate_writes_vqa_cells(tiny_vlm, synth_data, vlm_svd, experts, tmp_path):
    from t2eval.evaluate import evaluate
    from t2eval.lm import T2LM
    from t2eval.results import read_cell
    from t2eval.tasks import get_task
    from t2eval.vlm_lm import T2VLM

    lm = T2LM(pretrained=str(tiny_vlm))
    assert isinstance(lm, T2VLM) and lm.MULTIMODAL and type(lm.model).__name__ == "LlavaNextForConditionalGeneration"
    assert lm.max_length == lm.model.config.text_config.max_position_embeddings
    seen = []  # the vision tower sees every request's pixels (a real forward hook, no mock)
    hook = lm.model.model.vision_tower.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    out = tmp_path / "raw/tiny-llava-next/base/synth_textvqa.json"
    cell = evaluate(str(tiny_vlm), "base", "synth_textvqa", out, lm=lm, data_dir=str(synth_data), limit=4)
    hook.remove()
    assert sum(seen) >= 4  # ≥ one crop per image
    assert read_cell(out) == cell
    task = get_task("synth_textvqa")
    docs = task.docs("test", synth_data)
    samples = sorted(_samples(out), key=lambda s: s["doc_id"])
    assert cell["metric"] == "vqa_acc" and cell["total"] == 4 and [s["doc_id"] for s in cell["per_sample"]] == [0, 1, 2, 3]
    for s, ps in zip(samples, cell["per_sample"]):
        assert ps["accuracy"] == pytest.approx(task.accuracy(docs[s["doc_id"]], s["resps"][0][0]))
        assert ps["correct"] == int(ps["accuracy"] > 0)
        ctx = s["arguments"][0][0] if isinstance(s["arguments"], list) else s["arguments"]["gen_args_0"]["arg_0"]
        assert ctx == task.prompt(lm.tokenizer, docs[s["doc_id"]])  # the task's own prompt, image placeholder in it
    assert cell["score"] == pytest.approx(sum(p["accuracy"] for p in cell["per_sample"]) / 4)
    prov = cell["provenance"]
    assert prov["stage"] == "evaluate" and prov["protocol"]["name"] == "release" and prov["inputs"]["model_config_sha256"]
    assert prov["config"]["task_options"] == {} and "note" not in cell  # tiny-llava-next: no embedded-model note
    base = [s["resps"][0][0] for s in samples]

    for kind in ("const", "random"):
        o = tmp_path / f"raw/tiny-llava-next/svf-{kind}/synth_textvqa.json"
        c = evaluate(str(tiny_vlm), f"svf-{kind}", "synth_textvqa", o, data_dir=str(synth_data), limit=4,
                     model_args=f"adapter=svf:{experts[kind]},svd={vlm_svd}")
        assert c["metric"] == "vqa_acc" and c["total"] == 4
        assert set(c["provenance"]["files"]) >= {"svd", "adapter"}
        resps = [s["resps"][0][0] for s in sorted(_samples(o), key=lambda s: s["doc_id"])]
        if kind == "const":
            assert resps == base  # constant z: W′ = W, the same greedy answers
        else:
            assert resps != base  # the expert changes the language model's answers


def test_t2_multimodal_lora_adapter(tiny_vlm, synth_data, tmp_path):
    """adapter=lora:PATH on a VLM: a peft adapter on the language model's attention (scoped by a regex, so
    CLIP's own q_proj/v_proj stay out) loads through lm-eval's peft path and changes the answers."""
    from t2eval.evaluate import evaluate
    from t2eval.lm import T2LM
    from t2eval.models.loading import load_model
    from t2eval.train.lora import lora_model

    peft_model = lora_model(load_model(str(tiny_vlm)), rank=4, alpha=8, language_prefix="model.language_model")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:  # peft starts B at 0 (the identity): a non-trivial adapter
                p.copy_(torch.randn(p.shape, generator=g))
    adapter = tmp_path / "lora"
    peft_model.save_pretrained(adapter)
    lm = T2LM(pretrained=str(tiny_vlm), adapter=f"lora:{adapter}")
    lora = [n for n, _ in lm.model.named_parameters() if "lora_" in n]
    assert len(lora) == 8 and all(".language_model.layers." in n for n in lora)  # 2 layers × q, v × A, B
    fresh = dict(load_model(str(tiny_vlm)).named_parameters())
    vision = {n: p for n, p in lm.model.named_parameters() if ".vision_tower." in n}
    assert vision and all(torch.equal(p, fresh[n.replace("base_model.model.", "", 1)]) for n, p in vision.items())
    out = tmp_path / "raw/tiny-llava-next/lora/synth_textvqa.json"
    cell = evaluate(str(tiny_vlm), "lora", "synth_textvqa", out, lm=lm, data_dir=str(synth_data), limit=3)
    assert cell["metric"] == "vqa_acc" and cell["total"] == 3
    base_out = tmp_path / "raw/tiny-llava-next/base/synth_textvqa.json"
    evaluate(str(tiny_vlm), "base", "synth_textvqa", base_out, data_dir=str(synth_data), limit=3)
    assert [s["resps"] for s in _samples(out)] != [s["resps"] for s in _samples(base_out)]


def test_svf_on_the_vlm_scales_only_language_matrices_and_const_z_keeps_logits(tiny_vlm, vlm_svd, experts):
    from t2eval.lm import T2LM
    from t2eval.models.loading import load_model
    from t2eval.svd import load_svd

    fresh = dict(load_model(str(tiny_vlm)).named_parameters())
    names = set(load_svd(vlm_svd).names)
    assert names and all(n.startswith("model.language_model.layers.") and ".mlp." in n for n in names)
    lm = T2LM(pretrained=str(tiny_vlm), adapter=f"svf:{experts['random']}", svd=vlm_svd)
    changed = {n for n, p in lm.model.named_parameters() if not torch.equal(p, fresh[n])}
    assert changed == names  # vision tower, projector, embeddings, attention untouched

    lm.t2_swapper.set_scales(None)  # base weights back, bit-exact
    assert all(torch.equal(p, fresh[n]) for n, p in lm.model.named_parameters())
    task_img = Image.new("RGB", (48, 36), (200, 30, 30))
    text = lm.apply_chat_template([{"role": "user", "content": "<image>\nWhat does the sign say?"}])
    enc = lm.tok_batch_multimodal_encode([text], [[task_img]])
    assert int((enc["input_ids"] == lm.model.config.image_token_index).sum()) > 16 and "pixel_values" in enc
    with torch.no_grad():
        base = lm.model(**enc).logits
    from t2eval.adapt.experts import ExpertBank

    lm.t2_swapper.set_scales(ExpertBank(vlm_svd).scales(experts["const"]))
    with torch.no_grad():
        same = lm.model(**enc).logits
    assert (same - base).abs().max().item() <= 1e-5
    lm.t2_swapper.set_scales(None)
    with torch.no_grad():
        assert torch.equal(lm.model(**enc).logits, base)


def test_dispatch_and_mixture_strategies_refused_on_a_vlm(tiny_vlm, vlm_svd, experts):
    from t2eval.lm import T2LM

    e = experts["const"]
    with pytest.raises(T2EvalError, match="strategy=prompt needs a dispatch first pass.*vision-language"):
        T2LM(pretrained=str(tiny_vlm), strategy="prompt", svd=vlm_svd, expert_math=e, expert_code=e,
             expert_reasoning=e)
    with pytest.raises(T2EvalError, match="strategy=cls needs a dispatch first pass"):
        T2LM(pretrained=str(tiny_vlm), strategy="cls", svd=vlm_svd, cls_expert=e, expert_math=e, expert_code=e,
             expert_reasoning=e)


@pytest.mark.slow
def test_embedded_vlm_cells_carry_the_random_vision_note(smollm2_dir, synth_data, tmp_path):
    """smollm2-llava (SmolLM2's real weights, random vision): OCR tokens in the prompt by default, and the
    cell says plainly that the vision tower is random."""
    from t2eval.evaluate import evaluate
    from t2eval.models.llava import NOTE_RANDOM_VISION, build_smollm2_llava

    from t2eval.vlm_lm import text_context_length

    d = build_smollm2_llava(tmp_path / "smollm2-llava", seed=0, text_model=smollm2_dir)
    assert text_context_length(d) == 8192  # SmolLM2's, not lm-eval's 2048 fallback
    out = tmp_path / "raw/smollm2-llava/base/synth_textvqa.json"
    cell = evaluate(str(d), "base", "synth_textvqa", out, data_dir=str(synth_data), limit=2,
                    task_options={"normalise": "official"})
    assert cell["model"] == "smollm2-llava" and cell["note"] == NOTE_RANDOM_VISION
    assert cell["provenance"]["note"] == NOTE_RANDOM_VISION
    assert cell["provenance"]["config"]["task_options"] == {"normalise": "official", "ocr_in_prompt": True}
    s = _samples(out)[0]
    ctx = s["arguments"][0][0] if isinstance(s["arguments"], list) else s["arguments"]["gen_args_0"]["arg_0"]
    assert "OCR tokens: " in ctx
    opts = json.loads(s["doc"]["t2_options"])
    assert opts["ocr_in_prompt"] is True and opts["normalise"] == "official"
