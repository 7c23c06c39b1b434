"""The VQA datasets of the vision-language experiment (issue 10), for `t2eval prepare-data`.

    textvqa        hub lmms-lab/textvqa: train (34,602) -> textvqa/train.jsonl, validation (5,000) -> textvqa/test.jsonl
    okvqa          hub lmms-lab/OK-VQA: val2014 (5,046) -> okvqa/test.jsonl
    synth_textvqa  generated here (`synth_textvqa.generate`, seeded): train 2,000 / valid 200 / test 500

Rows: ``{question_id, question, image, answers[10], ocr_tokens}`` (+ ``image_id`` / ``question_type`` /
``answer_type`` where the source has them; OK-VQA has no OCR tokens: ``[]``). ``image`` is the path of the
image relative to the split file's directory, content-addressed: ``images/<sha256>.<ext>`` holding the
source's bytes as they are (TextVQA/OK-VQA JPEGs, the generator's PNGs), so a file's name is the hash of
its content (checked whenever a task opens it: `load_image`).

Sources: a local mirror with the hub's parquet layout (``<mirror>/textvqa/data/{train,validation}-*.parquet``,
``<mirror>/okvqa/data/val2014-*.parquet``: a snapshot of the dataset repository), else the hub
(``datasets.load_dataset``; never with HF_HUB_OFFLINE=1). Parquet files are streamed in record batches,
so memory stays O(batch) for the 6 GB TextVQA train split.

Validation before the manifest records a split: 10 answers (strings) per row, a non-empty question,
OCR tokens a list of strings, unique question ids, every image decodes, the known row count
(`COUNTS`; synth_textvqa: the requested sizes). The manifest entry of a split is the one of every
dataset (path, rows, sha256, source, version) plus ``images`` (distinct image files) and, for
synth_textvqa, ``generator`` (generator version, Pillow / FreeType / zlib, seed, sizes).
`up_to_date` tells whether a dataset's files still match its manifest entry (and the requested
synth sizes / seed / generator version), so an unchanged dataset is not rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import CorruptArtifactError, MissingDatasetError, T2EvalError

log = logging.getLogger(__name__)

VQA_DATASETS: tuple[str, ...] = ("textvqa", "okvqa", "synth_textvqa")
HUB = {"textvqa": "lmms-lab/textvqa", "okvqa": "lmms-lab/OK-VQA"}
# our split -> the hub split it is read from
HUB_SPLITS = {"textvqa": {"train": "train", "test": "validation"}, "okvqa": {"test": "val2014"}}
COUNTS = {"textvqa": {"train": 34602, "test": 5000}, "okvqa": {"test": 5046}}
N_ANSWERS = 10
EXTRA_FIELDS = ("image_id", "question_type", "answer_type")
IMAGES = "images"
_BATCH = 64


def splits_of(name: str, synth_sizes: dict[str, int] | None = None) -> tuple[str, ...]:
    if name == "synth_textvqa":
        from .synth_textvqa import DEFAULT_SIZES

        return tuple(synth_sizes or DEFAULT_SIZES)
    return tuple(HUB_SPLITS[name])


def parse_sizes(text: str | dict | None) -> dict[str, int] | None:
    """``"train=24,valid=4,test=8"`` (or a dict) -> {split: rows}; None -> None (the generator's defaults)."""
    if text in (None, ""):
        return None
    if isinstance(text, dict):
        items = list(text.items())
    else:
        items = []
        for part in str(text).split(","):
            if "=" not in part:
                raise T2EvalError(f"synth_textvqa sizes {text!r}: give split=rows items, e.g. train=2000,valid=200,test=500")
            k, v = part.split("=", 1)
            items.append((k.strip(), v.strip()))
    from .synth_textvqa import SPLITS

    out = {}
    for k, v in items:
        if k not in SPLITS or not str(v).isdigit():
            raise T2EvalError(f"synth_textvqa sizes {text!r}: splits are {', '.join(SPLITS)}, rows a number ≥ 0")
        out[k] = int(v)
    return out


# --------------------------------------------------------------------------- images

def _ext(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    from PIL import Image

    try:
        fmt = Image.open(io.BytesIO(data)).format or "bin"
    except Exception:  # noqa: BLE001 - decided by check_image below
        fmt = "bin"
    return {"JPEG": "jpg"}.get(fmt, fmt.lower())


def check_image(data: bytes, where: str) -> None:
    """Raise `T2EvalError` unless `data` decodes as an image."""
    from PIL import Image

    try:
        Image.open(io.BytesIO(data)).load()
    except Exception as e:  # noqa: BLE001 - any decoder failure is a broken image
        raise T2EvalError(f"{where}: the image does not decode ({type(e).__name__}: {e}); the source is "
                          "corrupt or truncated: replace it") from None


def store_image(split_dir: Path, data: bytes, where: str) -> str:
    """Write `data` as ``<split_dir>/images/<sha256>.<ext>`` (once: content-addressed) after checking
    that it decodes; returns the relative path."""
    check_image(data, where)
    rel = f"{IMAGES}/{hashlib.sha256(data).hexdigest()}.{_ext(data)}"
    p = split_dir / rel
    if not p.is_file() or p.stat().st_size != len(data):
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, p)
    return rel


def load_image(path: str | os.PathLike):
    """The RGB PIL image of a prepared content-addressed file; a missing file or one whose content is not
    the hash its name says is a `CorruptArtifactError` naming the file and the remedy."""
    from PIL import Image

    p = Path(path)
    remedy = "re-run `t2eval prepare-data --datasets <dataset> --force` for its dataset"
    if not p.is_file():
        raise CorruptArtifactError(f"image {p} is missing: {remedy}")
    data = p.read_bytes()
    if hashlib.sha256(data).hexdigest() != p.stem:
        raise CorruptArtifactError(f"image {p} does not hold the content its name (sha256) addresses: the file "
                                   f"was changed after prepare-data; {remedy}")
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


# --------------------------------------------------------------------------- sources

def parquet_files(mirror: Path, name: str, hub_split: str) -> list[Path]:
    """The mirror's parquet shards of one hub split, in shard order (the hub layout ``data/<split>-*.parquet``)."""
    d = mirror / name / "data"
    return sorted(d.glob(f"{hub_split}-*.parquet")) if d.is_dir() else []


def read_parquet(files: Iterable[Path]) -> Iterator[tuple[str, dict]]:
    """(``file row N`` location, row) of every row of the shards, streamed by record batch; the image
    column stays raw (``{"bytes", "path"}``)."""
    import pyarrow.parquet as pq

    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise T2EvalError(f"{f}: not a readable parquet file ({type(e).__name__}: {e}); replace it") from None
        n = 0
        for batch in pf.iter_batches(batch_size=_BATCH):
            for row in batch.to_pylist():
                yield f"{f} row {n}", row
                n += 1


def _hub_rows(repo: str, hub_split: str) -> Iterator[tuple[str, dict]]:
    import datasets  # heavy; only on the network path

    ds = datasets.load_dataset(repo, split=hub_split)
    ds = ds.cast_column("image", datasets.Image(decode=False))
    for i, row in enumerate(ds):
        yield f"hub:{repo}[{hub_split}] row {i}", row


def _image_bytes(value: Any, where: str) -> bytes:
    if isinstance(value, dict) and isinstance(value.get("bytes"), (bytes, bytearray)):
        return bytes(value["bytes"])
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise T2EvalError(f"{where}: field 'image' holds no image bytes (found {type(value).__name__}"
                      f"{' with path ' + repr(value.get('path')) if isinstance(value, dict) else ''}); the mirror "
                      "must keep the hub's parquet files with embedded images")


def canonical_row(row: dict, where: str, split_dir: Path) -> dict:
    """The canonical row of one source row (image stored under `split_dir`), validated."""
    q, answers = row.get("question"), row.get("answers")
    if not isinstance(q, str) or not q.strip():
        raise T2EvalError(f"{where}: field 'question' must be a non-empty string, found {q!r}")
    if not isinstance(answers, list) or len(answers) != N_ANSWERS or not all(isinstance(a, str) for a in answers):
        n = len(answers) if isinstance(answers, list) else type(answers).__name__
        raise T2EvalError(f"{where}: field 'answers' must be the {N_ANSWERS} annotator answers (strings), found {n}")
    ocr = row.get("ocr_tokens") or []
    if not isinstance(ocr, list) or not all(isinstance(t, str) for t in ocr):
        raise T2EvalError(f"{where}: field 'ocr_tokens' must be a list of strings")
    if row.get("question_id") is None:
        raise T2EvalError(f"{where}: missing field 'question_id'")
    out = {"question_id": row["question_id"], "question": q, "image": "", "answers": list(answers),
           "ocr_tokens": list(ocr)}
    out.update({k: row[k] for k in EXTRA_FIELDS if isinstance(row.get(k), (str, int))})
    out["image"] = store_image(split_dir, _image_bytes(row.get("image"), where), where)
    return out


def read_split(rows: Iterable[tuple[str, dict]], split_dir: Path) -> list[dict]:
    """Canonical rows (images written under `split_dir`), question ids unique."""
    out, seen = [], {}
    for where, row in rows:
        r = canonical_row(row, where, split_dir)
        if r["question_id"] in seen:
            raise T2EvalError(f"{where}: duplicate question_id {r['question_id']!r} (first at {seen[r['question_id']]})")
        seen[r["question_id"]] = where
        out.append(r)
    return out


def _files_version(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return f"sha256:{h.hexdigest()[:16]}"


def _missing(name: str, mirror: Path | None, reason: str) -> MissingDatasetError:
    layout = ", ".join(f"{name}/data/{s}-*.parquet" for s in HUB_SPLITS[name].values())
    where = (f"not in the mirror {mirror} (looked for {layout})" if mirror is not None
             else "no data mirror configured (--mirror, $T2EVAL_DATA_MIRROR or `mirror:` in the config)")
    return MissingDatasetError(
        f"dataset {name!r} not found: {where}, and {reason}.\nProvide it in either way:\n"
        f"  1. a local mirror DIR holding {layout} (a snapshot of the hub repository {HUB[name]}, "
        f"parquet with embedded images): pass --mirror DIR or set T2EVAL_DATA_MIRROR=DIR;\n"
        f"  2. network access: unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE so that {HUB[name]} can be downloaded.")


def _sources(name: str, mirror: Path | None) -> dict[str, tuple[Iterable[tuple[str, dict]], str, str]]:
    """{our split: (rows, source, version)} from the mirror, else the hub."""
    from .datasets import hub_offline

    found = {s: parquet_files(mirror, name, hs) for s, hs in HUB_SPLITS[name].items()} if mirror else {}
    if found and all(found.values()):
        return {s: (read_parquet(fs), f"mirror:{mirror / name / 'data'}/{HUB_SPLITS[name][s]}-*.parquet "
                    f"({len(fs)} files)", _files_version(fs)) for s, fs in found.items()}
    if hub_offline():
        raise _missing(name, mirror, "the network is disabled (HF_HUB_OFFLINE=1)")
    return {s: (_hub_rows(HUB[name], hs), f"hub:{HUB[name]}[{hs}]", None) for s, hs in HUB_SPLITS[name].items()}


# --------------------------------------------------------------------------- prepare

def _write_jsonl(path: Path, rows: list[dict]) -> str:
    from .datasets import _serialise, _write_atomic

    data = _serialise(rows)
    _write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def prepare(name: str, out: Path, mirror: Path | None, opts: dict | None = None) -> dict:
    """Materialise one VQA dataset under ``out/<name>/``; returns its manifest entry {split: {...}}."""
    opts = dict(opts or {})
    if name == "synth_textvqa":
        return _prepare_synth(out, parse_sizes(opts.get("synth_textvqa_sizes")), int(opts.get("synth_textvqa_seed") or 0))
    if name not in HUB:
        raise T2EvalError(f"unknown VQA dataset {name!r}; choose from {', '.join(VQA_DATASETS)}")
    split_dir = out / name
    entry = {}
    for split, (rows, source, version) in _sources(name, mirror).items():
        try:
            canon = read_split(rows, split_dir)
        except T2EvalError:
            raise
        except Exception as e:  # noqa: BLE001 - a network/library failure becomes one clear message
            if source.startswith("hub:"):
                raise _missing(name, mirror, f"downloading it failed ({type(e).__name__}: {str(e)[:200]})") from None
            raise
        want = COUNTS[name][split]
        if len(canon) != want:
            raise T2EvalError(f"{source}: wrong row count for {name}/{split}: expected {want}, found {len(canon)}; "
                              "the source is truncated or a different release; replace it")
        rel = f"{name}/{split}.jsonl"
        entry[split] = {"path": rel, "rows": len(canon), "sha256": _write_jsonl(out / rel, canon), "source": source,
                        "version": version, "images": len({r["image"] for r in canon})}
    return entry


def _prepare_synth(out: Path, sizes: dict[str, int] | None, seed: int) -> dict:
    from . import synth_textvqa as G

    sizes = dict(sizes or G.DEFAULT_SIZES)
    d = out / "synth_textvqa"
    info = G.generate(d, sizes, seed=seed)
    G.validate(d, sizes)
    gen = {k: info[k] for k in ("generator", "version", "pillow", "freetype", "zlib", "font", "seed", "sizes")}
    entry = {}
    for split in sizes:
        p = d / f"{split}.jsonl"
        rows = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
        entry[split] = {"path": f"synth_textvqa/{split}.jsonl", "rows": len(rows),
                        "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                        "source": f"generated:{G.GENERATOR} v{G.GENERATOR_VERSION} seed={seed}",
                        "version": synth_version(seed), "images": len({r["image"] for r in rows}), "generator": gen}
    return entry


def synth_version(seed: int) -> str:
    from .synth_textvqa import GENERATOR_VERSION

    return f"v{GENERATOR_VERSION}-seed{seed}"


def up_to_date(out: Path, name: str, entry: dict | None, opts: dict | None = None) -> bool:
    """True when the manifest entry has every split a run would write, each file has its recorded sha256
    and every image it names exists (synth_textvqa: with the content its name addresses, and the requested
    sizes, seed and generator version)."""
    from .datasets import _file_sha256, read_jsonl_rows

    opts = dict(opts or {})
    if not entry:
        return False
    synth = name == "synth_textvqa"
    sizes = parse_sizes(opts.get("synth_textvqa_sizes")) if synth else None
    if set(entry) != set(splits_of(name, sizes)):
        return False
    for split, e in entry.items():
        p = out / e.get("path", "")
        if not p.is_file() or _file_sha256(p) != e.get("sha256"):
            return False
        if synth:
            from .synth_textvqa import DEFAULT_SIZES

            if e.get("version") != synth_version(int(opts.get("synth_textvqa_seed") or 0)) or \
                    e.get("rows") != (sizes or DEFAULT_SIZES)[split]:
                return False
        for _, row in read_jsonl_rows(p):
            img = p.parent / str(row.get("image", ""))
            if not img.is_file():
                return False
            if synth and hashlib.sha256(img.read_bytes()).hexdigest() != img.stem:
                return False
    return True
