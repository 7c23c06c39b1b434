"""Materialise every dataset split the protocol needs as canonical JSONL + a manifest.

`prepare_data(out, mirror=..., datasets=..., force=...)` writes `out/<dataset>/<split>.jsonl`
(one JSON object per line, the source fields kept as they are, in source order) and
`out/manifest.json`::

    {"datasets": {name: {split: {"path", "rows", "sha256", "source", "version"}}}, "provenance": {...}}

Sources, in order: a local mirror directory (``--mirror DIR``, env ``T2EVAL_DATA_MIRROR`` or a
``mirror:`` config value; layout in `MIRROR_LAYOUT`), then the network (Hugging Face hub via
``datasets.load_dataset``; HumanEval+/MBPP+ via the evalplus package's release files). With
``HF_HUB_OFFLINE=1`` (or ``HF_DATASETS_OFFLINE=1``) the network is not tried at all, so a missing
dataset fails at once with a `MissingDatasetError` that names both remedies.

Every source is validated before anything is written: required fields and types per row (a bad
row is reported as ``file:line: reason``), unique ids, and the known row count per split
(reported with the file, the expected and the found count). Writes are atomic (temp + rename)
and the manifest is updated after each dataset, so an interrupted run keeps what it finished;
a dataset whose files already match the manifest is skipped unless ``force``. Each manifest update
holds an exclusive lock (``fcntl`` on ``out/.manifest.lock``) and re-reads the manifest first, so
concurrent partial runs never drop each other's entries.

Versioned release files (MBPP+, HumanEval+): every release present is materialised as its own split
``test-<version>`` (``mbppplus/test-v0.1.0.jsonl``, ``mbppplus/test-v0.2.0.jsonl``), so switching
between the code release's versions (MBPP+ v0.1.0, HumanEval+ v0.1.9) and the current ones needs no
new download; ``--mbppplus-version`` / ``--humanevalplus-version`` restrict a run to one release
(missing → an error naming the file). Without a mirror the network / evalplus cache path fetches
the release version and evalplus's current one.

VQA datasets (textvqa, okvqa, synth_textvqa; issue 10) are written by `vqa_data` (images, hub parquet
mirrors, the generator) into the same manifest, only when named in ``datasets``.

ARC-Challenge: the mirror's test.jsonl has letter-normalised labels; its
``test_original_labels.jsonl`` (required) restores the original labels and answerKey of each row
(22 of 1172 keyed "1".."4", as on the hub), checked row by row (same id, same number of choices,
the correct answer at the same position).
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..config import DATA_MIRROR_ENV
from ..errors import MissingDatasetError, T2EvalError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"

# MBPP+ release -> problem count (evalplus). Unknown releases are accepted without a count check.
MBPPPLUS_COUNTS = {"v0.1.0": 399, "v0.2.0": 378}
HUMANEVALPLUS_COUNTS = {"v0.1.9": 164, "v0.1.10": 164}
# the releases the paper's code used (evalplus @1895d2f6, PROTOCOL §8); the network path fetches these too
RELEASE_VERSIONS = {"mbppplus": "v0.1.0", "humanevalplus": "v0.1.9"}
VERSIONED = ("mbppplus", "humanevalplus")
ARC_CHALLENGE_LABELS = "test_original_labels.jsonl"
# upstream MBPP task_id ranges (google-research mbpp README)
MBPP_RANGES = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                 "number_theory", "prealgebra", "precalculus")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    splits: tuple[str, ...]
    required: dict[str, type]           # field -> type every row must have
    counts: dict[str, int]              # split -> known row count (versioned datasets: see counts_for)
    id_field: str | None                # must be unique within a split when set
    layout: str                         # expected mirror layout (for error messages)
    hub: str                            # where the network fallback gets it (for error messages)
    check: Callable[[dict], str | None] | None = None  # extra per-row check -> reason or None
    extra: dict[str, Any] = field(default_factory=dict)


def _check_gsm8k(row: dict) -> str | None:
    return None if "####" in row["answer"] else "field 'answer' has no '#### <final answer>' marker"


def _check_arc(row: dict) -> str | None:
    ch = row["choices"]
    if not isinstance(ch, dict) or not isinstance(ch.get("text"), list) or not isinstance(ch.get("label"), list):
        return "field 'choices' must be an object with lists 'text' and 'label'"
    if len(ch["text"]) != len(ch["label"]) or len(ch["text"]) < 2:
        return f"'choices' has {len(ch['text'])} texts and {len(ch['label'])} labels (need equal, >= 2)"
    if row["answerKey"] not in ch["label"]:
        return f"answerKey {row['answerKey']!r} is not one of the labels {ch['label']}"
    return None


def _check_mbpp(row: dict) -> str | None:
    return None if row["test_list"] else "field 'test_list' is empty"


_ARC_FIELDS = {"id": str, "question": str, "choices": dict, "answerKey": str}
_CODE_FIELDS = {"task_id": str, "prompt": str, "entry_point": str, "canonical_solution": str}

SPECS: dict[str, DatasetSpec] = {s.name: s for s in (
    DatasetSpec("gsm8k", ("train", "test"), {"question": str, "answer": str}, {"train": 7473, "test": 1319},
                None, "gsm8k/{train,test}.jsonl (fields question, answer)",
                "hub openai/gsm8k, config main", _check_gsm8k),
    DatasetSpec("arc_easy", ("train", "validation", "test"), _ARC_FIELDS,
                {"train": 2251, "validation": 570, "test": 2376}, "id",
                "arc_easy/{train,validation,test}.jsonl (fields id, question, choices{text,label}, answerKey)",
                "hub allenai/ai2_arc, config ARC-Easy", _check_arc),
    DatasetSpec("arc_challenge", ("test",), _ARC_FIELDS, {"test": 1172}, "id",
                "arc_challenge/test.jsonl (fields id, question, choices{text,label}, answerKey) and "
                "arc_challenge/test_original_labels.jsonl (fields id, labels, answerKey)",
                "hub allenai/ai2_arc, config ARC-Challenge", _check_arc),
    DatasetSpec("math", ("train", "test", "math500"), {"problem": str, "solution": str},
                {"train": 7500, "test": 5000, "math500": 500}, "unique_id",
                "math/{train,test}.jsonl (fields problem, level, type, solution) and math/math500_test.jsonl "
                "(fields problem, solution, answer, unique_id)",
                "hub EleutherAI/hendrycks_math (all subject configs) and HuggingFaceH4/MATH-500"),
    DatasetSpec("humaneval", ("test",), {**_CODE_FIELDS, "test": str}, {"test": 164}, "task_id",
                "humaneval/HumanEval.jsonl[.gz] (fields task_id, prompt, entry_point, canonical_solution, test)",
                "hub openai/openai_humaneval"),
    DatasetSpec("humanevalplus", ("test-<version>",), {**_CODE_FIELDS, "test": str, "base_input": list}, {}, "task_id",
                "humanevalplus/HumanEvalPlus-v<version>.jsonl[.gz] (evalplus release file)",
                "the evalplus package (downloads the HumanEval+ release from GitHub)"),
    DatasetSpec("mbppplus", ("test-<version>",), {**_CODE_FIELDS, "base_input": list}, {}, "task_id",
                "mbppplus/MbppPlus-v<version>.jsonl[.gz] (evalplus release file)",
                "the evalplus package (downloads the MBPP+ release from GitHub)"),
    DatasetSpec("mbpp", ("train", "validation", "test", "prompt"),
                {"task_id": int, "text": str, "code": str, "test_list": list},
                {s: b - a + 1 for s, (a, b) in MBPP_RANGES.items()}, "task_id",
                "mbpp/mbpp.jsonl (all 974 problems; split by task_id 1-10 prompt, 11-510 test, "
                "511-600 validation, 601-974 train) or mbpp/{train,validation,test,prompt}.jsonl",
                "hub google-research-datasets/mbpp, config full", _check_mbpp),
)}
DATASETS: tuple[str, ...] = tuple(SPECS)


def version_split(version: str | None) -> str:
    """The manifest split of one release of a versioned dataset: ``test-v0.1.0``."""
    return f"test-{version or 'unknown'}"


@dataclass
class SplitSource:
    """Rows of one split as read from a source, before validation."""
    rows: list[tuple[int, dict]]   # (line number or row index, row)
    where: str                     # file path or hub description, used in messages
    source: str                    # manifest "source"
    version: str | None            # manifest "version"
    is_file: bool = True           # `where` is a file (messages use file:line) or a hub split (row N)
    finish: Callable[["SplitSource"], None] | None = None  # applied after validation (ARC labels)


# --------------------------------------------------------------------------- reading files

def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")


def read_jsonl_rows(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, object) per non-empty line; a malformed line raises `T2EvalError` as file:line."""
    p = Path(path)
    out = []
    try:
        with _open_text(p) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise T2EvalError(f"{p}:{n}: invalid JSON ({e.msg} at column {e.colno}); "
                                      "fix or replace the file") from None
                if not isinstance(obj, dict):
                    raise T2EvalError(f"{p}:{n}: expected a JSON object, found {type(obj).__name__}")
                out.append((n, obj))
    except (OSError, EOFError, UnicodeDecodeError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise T2EvalError(f"{p}: cannot read ({e}); replace the file") from None
    return out


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _mirror_file(path: Path) -> SplitSource:
    return SplitSource(read_jsonl_rows(path), str(path), f"mirror:{path}", f"sha256:{_file_sha256(path)[:16]}")


def _first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def _version_key(v: str) -> tuple:
    return tuple(int(x) if x.isdigit() else x for x in re.split(r"[.\-]", v.lstrip("v")))


def _evalplus_files(d: Path, stem: str) -> dict[str, Path]:
    """version ("unknown" for an unversioned file) -> release file `<stem>[-v<version>].jsonl[.gz]` in d."""
    found: dict[str, Path] = {}
    for p in sorted(d.glob(f"{stem}*.jsonl*")) if d.is_dir() else []:
        m = re.fullmatch(re.escape(stem) + r"(?:-(v[0-9][\w.]*?))?\.jsonl(?:\.gz)?", p.name)
        if m:
            found.setdefault(m.group(1) or "unknown", p)
    return found


# --------------------------------------------------------------------------- mirror readers
# Each returns {split: SplitSource} or raises _Missing(list of expected paths).

class _Missing(Exception):
    def __init__(self, expected: list[str]):
        super().__init__(", ".join(expected))
        self.expected = expected


def _mirror_plain(mirror: Path, name: str, files: dict[str, str]) -> dict[str, SplitSource]:
    paths = {s: mirror / name / f for s, f in files.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise _Missing(missing)
    return {s: _mirror_file(p) for s, p in paths.items()}


def _mirror_humaneval(mirror: Path, opts: dict) -> dict[str, SplitSource]:
    d = mirror / "humaneval"
    p = _first_existing(d / "HumanEval.jsonl.gz", d / "HumanEval.jsonl", d / "test.jsonl")
    if p is None:
        raise _Missing([str(d / "HumanEval.jsonl.gz")])
    return {"test": _mirror_file(p)}


def _mirror_evalplus(mirror: Path, name: str, stem: str, want: str | None) -> dict[str, SplitSource]:
    """Every release file in the mirror (or only `want`), one split `test-<version>` each."""
    d = mirror / name
    found = _evalplus_files(d, stem)
    if not found:
        raise _Missing([str(d / f"{stem}-{want or 'v<version>'}.jsonl.gz")])
    if want is not None:
        if want not in found:
            raise T2EvalError(f"{d}: no {stem} release {want} (found {', '.join(sorted(found))}); "
                              f"add {d / f'{stem}-{want}.jsonl.gz'} (the evalplus release file) or choose "
                              "another version")
        found = {want: found[want]}
    out = {}
    for version, path in found.items():
        src = _mirror_file(path)
        src.version = version
        out[version_split(version)] = src
    return out


def _mirror_mbpp(mirror: Path, opts: dict) -> dict[str, SplitSource]:
    d = mirror / "mbpp"
    full = _first_existing(d / "mbpp.jsonl", d / "mbpp.jsonl.gz")
    if full is None:
        try:
            return _mirror_plain(mirror, "mbpp", {s: f"{s}.jsonl" for s in MBPP_RANGES})
        except _Missing:
            raise _Missing([str(d / "mbpp.jsonl")]) from None
    allsrc = _mirror_file(full)
    out = {}
    for split, (a, b) in MBPP_RANGES.items():
        rows = [(n, r) for n, r in allsrc.rows if isinstance(r.get("task_id"), int) and a <= r["task_id"] <= b]
        rows.sort(key=lambda nr: nr[1]["task_id"])
        out[split] = SplitSource(rows, str(full), f"{allsrc.source} (task_id {a}-{b})", allsrc.version)
    bad = [(n, r) for n, r in allsrc.rows if not isinstance(r.get("task_id"), int)]
    if bad:
        n, r = bad[0]
        raise T2EvalError(f"{full}:{n}: field 'task_id' must be an integer, found {r.get('task_id')!r}")
    return out


def _mirror_arc_challenge(mirror: Path, opts: dict) -> dict[str, SplitSource]:
    """test.jsonl (letter-normalised labels) + test_original_labels.jsonl, joined after validation."""
    src = _mirror_plain(mirror, "arc_challenge", {"test": "test.jsonl"})["test"]
    labels = mirror / "arc_challenge" / ARC_CHALLENGE_LABELS
    if not labels.is_file():
        raise _Missing([str(labels) + " (the original labels and answer keys; the letter-normalised "
                        "test.jsonl alone cannot reproduce the release's ARC-Challenge scoring)"])
    src.finish = lambda s: restore_arc_labels(s, labels)
    return {"test": src}


def restore_arc_labels(src: SplitSource, labels_path: Path) -> None:
    """Replace each row's choice labels and answerKey by the original ones of `labels_path`
    (same order, fields id, labels, answerKey); the correct choice must stay at the same position."""
    rows = read_jsonl_rows(labels_path)
    if len(rows) != len(src.rows):
        raise T2EvalError(f"{labels_path}: {len(rows)} rows but {src.where} has {len(src.rows)}; "
                          "the two files must list the same items in the same order; replace them")
    for (n, lab), (_, row) in zip(rows, src.rows):
        where = f"{labels_path}:{n}"
        if lab.get("id") != row["id"]:
            raise T2EvalError(f"{where}: id {lab.get('id')!r} but {src.where} has {row['id']!r} at this position")
        labels, key = lab.get("labels"), lab.get("answerKey")
        if not isinstance(labels, list) or len(labels) != len(row["choices"]["text"]) or key not in labels:
            raise T2EvalError(f"{where}: labels {labels!r} / answerKey {key!r} do not fit the "
                              f"{len(row['choices']['text'])} choices of {row['id']}")
        if labels.index(key) != row["choices"]["label"].index(row["answerKey"]):
            raise T2EvalError(f"{where}: answerKey {key!r} is choice {labels.index(key) + 1} but {src.where} "
                              f"marks choice {row['choices']['label'].index(row['answerKey']) + 1} of {row['id']}")
        row["choices"] = {**row["choices"], "label": list(labels)}
        row["answerKey"] = key
    src.source += f" + labels {labels_path}"
    src.version = f"{src.version}+{_file_sha256(labels_path)[:16]}"


def _mirror_math(mirror: Path, opts: dict) -> dict[str, SplitSource]:
    return _mirror_plain(mirror, "math", {"train": "train.jsonl", "test": "test.jsonl",
                                          "math500": "math500_test.jsonl"})


MIRROR_READERS: dict[str, Callable[[Path, dict], dict[str, SplitSource]]] = {
    "gsm8k": lambda m, o: _mirror_plain(m, "gsm8k", {"train": "train.jsonl", "test": "test.jsonl"}),
    "arc_easy": lambda m, o: _mirror_plain(m, "arc_easy", {s: f"{s}.jsonl" for s in ("train", "validation", "test")}),
    "arc_challenge": _mirror_arc_challenge,
    "math": _mirror_math,
    "humaneval": _mirror_humaneval,
    "humanevalplus": lambda m, o: _mirror_evalplus(m, "humanevalplus", "HumanEvalPlus", o.get("humanevalplus_version")),
    "mbppplus": lambda m, o: _mirror_evalplus(m, "mbppplus", "MbppPlus", o.get("mbppplus_version")),
    "mbpp": _mirror_mbpp,
}
MIRROR_LAYOUT = "\n".join(f"  {s.layout}" for s in SPECS.values())


# --------------------------------------------------------------------------- network readers

def hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hub_rows(repo: str, config: str | None, split: str) -> SplitSource:
    from datasets import load_dataset  # heavy; only on the network path

    ds = load_dataset(repo, config, split=split)
    where = f"hub:{repo}" + (f"/{config}" if config else "") + f"[{split}]"
    version = getattr(ds, "_fingerprint", None) or str(getattr(ds.info, "version", None) or "")
    return SplitSource([(i, dict(r)) for i, r in enumerate(ds)], where, where, version or None, is_file=False)


def _hub_math(opts: dict) -> dict[str, SplitSource]:
    out = {}
    for split in ("train", "test"):
        rows, fps = [], []
        for subj in MATH_SUBJECTS:
            s = _hub_rows("EleutherAI/hendrycks_math", subj, split)
            rows.extend(r for _, r in s.rows)
            fps.append(s.version or "")
        where = f"hub:EleutherAI/hendrycks_math/*[{split}]"
        out[split] = SplitSource(list(enumerate(rows)), where, where,
                                 hashlib.sha256("".join(fps).encode()).hexdigest()[:16], is_file=False)
    out["math500"] = _hub_rows("HuggingFaceH4/MATH-500", None, "test")
    return out


def _evalplus_module(kind: str):
    """(current default version, path-of-release function) of evalplus for `kind`."""
    if kind == "mbppplus":
        from evalplus.data import mbpp as mod

        return mod.MBPP_PLUS_VERSION, mod._ready_mbpp_plus_path
    from evalplus.data import humaneval as mod

    return mod.HUMANEVAL_PLUS_VERSION, mod._ready_human_eval_plus_path


def _network_versions(kind: str, want: str | None, default: str) -> list[str]:
    """`want`, else the code release's version and evalplus's current one."""
    return [want] if want else sorted({RELEASE_VERSIONS[kind], default}, key=_version_key)


def _evalplus_release(kind: str, want: str | None) -> dict[str, SplitSource]:
    """The raw evalplus release files (not get_*_plus(), which turns inputs into non-JSON objects)."""
    default, ready = _evalplus_module(kind)
    out = {}
    for version in _network_versions(kind, want, default):
        path = Path(ready(version=version))
        src = _mirror_file(path)
        src.source, src.version = f"evalplus:{kind} {version} ({path})", version
        out[version_split(version)] = src
    return out


def _evalplus_cached(name: str, opts: dict) -> dict[str, SplitSource] | None:
    """HumanEval+/MBPP+ releases already in evalplus's own download cache (usable offline), or None."""
    if name not in VERSIONED:
        return None
    try:
        from evalplus.data.utils import get_dataset_metadata

        default, _ = _evalplus_module(name)
    except ImportError:
        return None
    stem = "MbppPlus" if name == "mbppplus" else "HumanEvalPlus"
    cached = [v for v in _network_versions(name, opts.get(f"{name}_version"), default)
              if Path(get_dataset_metadata(stem, v, False)[1]).is_file()]
    if not cached:
        return None
    out: dict[str, SplitSource] = {}
    for v in cached:
        out.update(_evalplus_release(name, v))
    return out


HUB_READERS: dict[str, Callable[[dict], dict[str, SplitSource]]] = {
    "gsm8k": lambda o: {s: _hub_rows("openai/gsm8k", "main", s) for s in ("train", "test")},
    "arc_easy": lambda o: {s: _hub_rows("allenai/ai2_arc", "ARC-Easy", s) for s in ("train", "validation", "test")},
    "arc_challenge": lambda o: {"test": _hub_rows("allenai/ai2_arc", "ARC-Challenge", "test")},
    "math": _hub_math,
    "humaneval": lambda o: {"test": _hub_rows("openai/openai_humaneval", None, "test")},
    "humanevalplus": lambda o: _evalplus_release("humanevalplus", o.get("humanevalplus_version")),
    "mbppplus": lambda o: _evalplus_release("mbppplus", o.get("mbppplus_version")),
    "mbpp": lambda o: {s: _hub_rows("google-research-datasets/mbpp", "full", s) for s in MBPP_RANGES},
}


# --------------------------------------------------------------------------- validation

def expected_count(name: str, split: str, version: str | None) -> int | None:
    if name == "mbppplus":
        return MBPPPLUS_COUNTS.get(version or "")
    if name == "humanevalplus":
        return HUMANEVALPLUS_COUNTS.get(version or "", 164)
    return SPECS[name].counts.get(split)


def _loc(src: SplitSource, n: int) -> str:
    return f"{src.where}:{n}" if src.is_file else f"{src.where} row {n}"


def validate_split(name: str, split: str, src: SplitSource) -> None:
    """Schema, id uniqueness and the known row count; raises `T2EvalError` naming file:line / counts."""
    spec = SPECS[name]
    required = dict(spec.required)
    if name == "math" and split != "math500":
        required.update(level=str, type=str)
    if name == "math" and split == "math500":
        required.update(answer=str, unique_id=str)
    seen: dict[Any, int] = {}
    for n, row in src.rows:
        for fname, typ in required.items():
            if fname not in row:
                raise T2EvalError(f"{_loc(src, n)}: missing field {fname!r} (every {name}/{split} row needs "
                                  f"{', '.join(required)})")
            if not isinstance(row[fname], typ) or (typ is int and isinstance(row[fname], bool)):
                raise T2EvalError(f"{_loc(src, n)}: field {fname!r} must be {typ.__name__}, "
                                  f"found {type(row[fname]).__name__}")
        if spec.check is not None and (reason := spec.check(row)):
            raise T2EvalError(f"{_loc(src, n)}: {reason}")
        if spec.id_field and spec.id_field in row:
            key = row[spec.id_field]
            if key in seen:
                raise T2EvalError(f"{_loc(src, n)}: duplicate {spec.id_field} {key!r} (first at line {seen[key]})")
            seen[key] = n
    want = expected_count(name, split, src.version)
    if want is None and name == "mbppplus":
        # unversioned release file: infer the release from the count when it is a known one
        inferred = {v: k for k, v in MBPPPLUS_COUNTS.items()}.get(len(src.rows))
        if inferred and (src.version in (None, "unknown")):
            src.version = inferred
            want = len(src.rows)
        else:
            log.warning("%s: MBPP+ release %s is not one of %s; row count %d not checked",
                        src.where, src.version, sorted(MBPPPLUS_COUNTS), len(src.rows))
    if want is not None and len(src.rows) != want:
        what = f"{name}/{split}" + (f" {src.version}" if name in ("mbppplus", "humanevalplus") else "")
        raise T2EvalError(f"{src.where}: wrong row count for {what}: expected {want}, found {len(src.rows)}; "
                          "the file is truncated or a different release; replace it")


# --------------------------------------------------------------------------- resolving sources

def resolve_mirror(cli_value: str | os.PathLike | None = None,
                   config_value: str | os.PathLike | None = None) -> Path | None:
    """--mirror, then env T2EVAL_DATA_MIRROR, then the config's `mirror:` value; None if none is set."""
    for v in (cli_value, os.environ.get(DATA_MIRROR_ENV) or None, config_value):
        if v:
            p = Path(v).expanduser()
            if not p.is_dir():
                raise T2EvalError(f"data mirror {p} is not a directory; fix --mirror / ${DATA_MIRROR_ENV} / "
                                  "the config's `mirror:` value")
            return p
    return None


def _missing_message(name: str, mirror: Path | None, expected: list[str], net_error: str) -> str:
    spec = SPECS[name]
    where = (f"not in the mirror {mirror} (looked for {', '.join(expected)})" if mirror is not None
             else f"no data mirror configured (--mirror, ${DATA_MIRROR_ENV} or `mirror:` in the config)")
    return (f"dataset {name!r} not found: {where}, and {net_error}.\n"
            f"Provide it in either way:\n"
            f"  1. a local mirror: pass --mirror DIR or set {DATA_MIRROR_ENV}=DIR (or `mirror: DIR` in the "
            f"config), where DIR holds {spec.layout};\n"
            f"  2. network access: unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE and make sure the source is "
            f"reachable ({spec.hub}).")


def read_source(name: str, mirror: Path | None, opts: dict | None = None) -> dict[str, SplitSource]:
    """All splits of a dataset from the mirror, else the network; `MissingDatasetError` if neither has it."""
    opts = dict(opts or {})
    expected: list[str] = []
    if mirror is not None:
        try:
            return MIRROR_READERS[name](mirror, opts)
        except _Missing as e:
            expected = e.expected
    if hub_offline():
        cached = _evalplus_cached(name, opts)
        if cached is not None:
            return cached
        raise MissingDatasetError(_missing_message(name, mirror, expected,
                                                   "the network is disabled (HF_HUB_OFFLINE=1)"))
    try:
        return HUB_READERS[name](opts)
    except T2EvalError:
        raise
    except Exception as e:  # noqa: BLE001 - any network/library failure becomes one clear message
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        raise MissingDatasetError(_missing_message(name, mirror, expected,
                                                   f"downloading it failed ({msg})")) from None


# --------------------------------------------------------------------------- writing

def _serialise(rows: Iterable[dict]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in rows)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(out: Path) -> dict:
    p = Path(out) / MANIFEST
    if not p.exists():
        return {"datasets": {}}
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise T2EvalError(f"{p}:{e.lineno}: corrupt manifest ({e.msg}); delete it and re-run "
                          "`t2eval prepare-data --force`") from None
    m.setdefault("datasets", {})
    return m


def expected_splits(name: str, mirror: Path | None, opts: dict | None = None) -> tuple[str, ...] | None:
    """The manifest splits a run would write for `name`; None when only reading the source can tell
    (a versioned dataset from the network or an unversioned release file)."""
    if name not in VERSIONED:
        return SPECS[name].splits
    want = (opts or {}).get(f"{name}_version")
    if want:
        return (version_split(want),)
    found = _evalplus_files(mirror / name, "MbppPlus" if name == "mbppplus" else "HumanEvalPlus") if mirror else {}
    if not found or "unknown" in found:
        return None
    return tuple(version_split(v) for v in found)


def dataset_up_to_date(out: Path, name: str, entry: dict | None, opts: dict | None = None,
                       mirror: Path | None = None) -> bool:
    """True when every split a run would write for `name` is in the manifest and its file has the
    recorded sha256 (versioned datasets: the requested release, or every release in the mirror)."""
    if not entry:
        return False
    want = expected_splits(name, mirror, opts)
    if name not in VERSIONED and set(entry) != set(want or ()):
        return False
    check = list(entry) if want is None else list(want)
    for split in check:
        e = entry.get(split)
        if e is None:
            return False
        p = Path(out) / e.get("path", "")
        if not p.is_file() or _file_sha256(p) != e.get("sha256"):
            return False
    return True


def prepare_data(out: str | os.PathLike, mirror: str | os.PathLike | None = None,
                 datasets: Iterable[str] | None = None, force: bool = False, *,
                 config_mirror: str | os.PathLike | None = None,
                 mbppplus_version: str | None = None, humanevalplus_version: str | None = None,
                 synth_textvqa_sizes: str | dict | None = None, synth_textvqa_seed: int = 0) -> dict:
    """Materialise `datasets` (default: all the LLM datasets, `DATASETS`; the VQA ones of `vqa_data` only
    when named) under `out`; returns the manifest dict (also written).

    mbppplus_version / humanevalplus_version: only that release (default: every release the mirror
    holds; from the network, the code release's and evalplus's current one).
    synth_textvqa_sizes ("train=2000,valid=200,test=500", the default) / synth_textvqa_seed: the generated set."""
    from . import vqa_data

    out = Path(out)
    names = list(datasets) if datasets is not None else list(DATASETS)
    unknown = [n for n in names if n not in SPECS and n not in vqa_data.VQA_DATASETS]
    if unknown:
        raise T2EvalError(f"unknown dataset(s) {', '.join(unknown)}; choose from "
                          f"{', '.join(DATASETS + vqa_data.VQA_DATASETS)}")
    mirror_dir = resolve_mirror(mirror, config_mirror)
    opts = {"mbppplus_version": mbppplus_version, "humanevalplus_version": humanevalplus_version,
            "synth_textvqa_sizes": synth_textvqa_sizes, "synth_textvqa_seed": synth_textvqa_seed}
    for name in names:
        t0 = time.perf_counter()
        if name in vqa_data.VQA_DATASETS:
            entry = read_manifest(out)["datasets"].get(name)
            if not force and vqa_data.up_to_date(out, name, entry, opts):
                log.info("%s: up to date (%s), skipped", name, out / name)
                continue
            entry = vqa_data.prepare(name, out, mirror_dir, opts)
            took = round(time.perf_counter() - t0, 3)
            update_manifest(out, name, entry, mirror=mirror_dir, seconds=took)
            log.info("%s: wrote %s in %.2fs", name, ", ".join(f"{s}={e['rows']}" for s, e in entry.items()), took)
            continue
        if not force and dataset_up_to_date(out, name, read_manifest(out)["datasets"].get(name), opts, mirror_dir):
            log.info("%s: up to date (%s), skipped", name, out / name)
            continue
        sources = read_source(name, mirror_dir, opts)
        splits = list(sources) if name in VERSIONED else list(SPECS[name].splits)
        for split in splits:
            if split not in sources:
                raise T2EvalError(f"{name}: source has no split {split!r}")
            validate_split(name, split, sources[split])
            if sources[split].finish is not None:
                sources[split].finish(sources[split])
        if name in VERSIONED:  # an unversioned release file gets its version from its row count
            sources = {version_split(src.version): src for src in sources.values()}
            splits = sorted(sources, key=lambda sp: _version_key(sp[len("test-"):]))
        entry = {}
        for split in splits:
            src = sources[split]
            data = _serialise(r for _, r in src.rows)
            rel = f"{name}/{split}.jsonl"
            _write_atomic(out / rel, data)
            entry[split] = {"path": rel, "rows": len(src.rows), "sha256": hashlib.sha256(data).hexdigest(),
                            "source": src.source, "version": src.version}
        took = round(time.perf_counter() - t0, 3)
        update_manifest(out, name, entry, merge=name in VERSIONED, mirror=mirror_dir, seconds=took)
        log.info("%s: wrote %s in %.2fs", name, ", ".join(f"{s}={e['rows']}" for s, e in entry.items()), took)
    if not (out / MANIFEST).exists():
        update_manifest(out, None, {}, mirror=mirror_dir)
    return read_manifest(out)


def _order(name: str) -> int:
    from .vqa_data import VQA_DATASETS

    order = DATASETS + VQA_DATASETS
    return order.index(name) if name in order else len(order)


class _ManifestLock:
    """Exclusive `fcntl` lock on `out/.manifest.lock` (blocks until the other writer is done)."""

    def __init__(self, out: Path):
        self.path = Path(out) / ".manifest.lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "a")
        fcntl.flock(self.f.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f.fileno(), fcntl.LOCK_UN)
        self.f.close()


def update_manifest(out: Path, name: str | None, entry: dict, *, merge: bool = False,
                    mirror: Path | None = None, seconds: float | None = None) -> dict:
    """Under the manifest lock: re-read the manifest, set (or, `merge`, update) `name`'s entry, write
    it atomically; returns the manifest written. Concurrent runs each keep the other's entries."""
    from ..provenance import code_version, write_json_atomic

    out = Path(out)
    with _ManifestLock(out):
        man = read_manifest(out)
        if name is not None:
            man["datasets"][name] = {**man["datasets"].get(name, {}), **entry} if merge else entry
        man["datasets"] = {k: man["datasets"][k] for k in sorted(man["datasets"], key=_order)}
        prov = man.get("provenance") if isinstance(man.get("provenance"), dict) else {}
        timings = dict(prov.get("timings") or {})
        if name is not None and seconds is not None:
            timings[name] = seconds
        man["provenance"] = {"stage": "prepare-data", "mirror": str(mirror) if mirror else None,
                             "code": code_version(), "timings": timings}
        write_json_atomic(out / MANIFEST, man)
    return man
