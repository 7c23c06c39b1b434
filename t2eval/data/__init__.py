"""Canonical datasets: `t2eval prepare-data` writes `data/<dataset>/<split>.jsonl` + `data/manifest.json`
(see `datasets.py`); `splits.py` turns them into the protocol's train/valid/test/few-shot splits.

    load_jsonl("gsm8k", "test")          # rows of data/gsm8k/test.jsonl
    manifest()                           # data/manifest.json as a dict

`load_jsonl` checks the file against the manifest (row count and sha256, verified once per file
version and process) before returning anything: a prepared split that was cut, edited or never
recorded is a clear `CorruptArtifactError` / `MissingDatasetError` naming the file and the remedy.
A directory without any manifest.json (not written by prepare-data, e.g. a raw mirror) is read
unchecked, with a warning.
"""

from __future__ import annotations

import os
from pathlib import Path

import logging

from ..errors import CorruptArtifactError, MissingDatasetError, T2EvalError

log = logging.getLogger(__name__)

__all__ = ["load_jsonl", "manifest", "dataset_path"]


def _data_dir(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is None:
        from ..config import default_data_dir

        return default_data_dir()
    return Path(data_dir)


def dataset_path(dataset: str, split: str, data_dir: str | os.PathLike | None = None) -> Path:
    return _data_dir(data_dir) / dataset / f"{split}.jsonl"


def load_jsonl(dataset: str, split: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Rows of the canonical file `<data_dir>/<dataset>/<split>.jsonl`, in file order."""
    from .datasets import read_jsonl_rows

    p, d = dataset_path(dataset, split, data_dir), _data_dir(data_dir)
    if not p.is_file():
        raise MissingDatasetError(
            f"{p} does not exist: the {dataset}/{split} split has not been prepared in {d}. Run "
            f"`t2eval prepare-data --out {d} --mirror DIR` (or set T2EVAL_DATA_MIRROR, or allow hub access), "
            "or point T2EVAL_DATA_DIR / data_dir at a prepared data directory")
    if not (d / "manifest.json").is_file():
        if d not in _UNCHECKED:
            _UNCHECKED.add(d)
            log.warning("%s has no manifest.json (not prepared by `t2eval prepare-data`): its files are read "
                        "without checking their row counts and sha256", d)
        return [row for _, row in read_jsonl_rows(p)]
    entry = _manifest_entry(dataset, split, data_dir, p)
    sha = _verified_sha(p)
    rows = [row for _, row in read_jsonl_rows(p)]
    if sha != entry.get("sha256") or len(rows) != entry.get("rows"):
        raise CorruptArtifactError(
            f"{p} does not match {d / 'manifest.json'}: {len(rows)} rows, sha256 {sha[:12]}… but the manifest "
            f"records {entry.get('rows')} rows, sha256 {str(entry.get('sha256'))[:12]}… (the file was cut or "
            f"edited after prepare-data). Re-create it: `t2eval prepare-data --out {d} --datasets {dataset} --force`")
    _VERIFIED[_stamp(p)] = sha
    return rows


_UNCHECKED: set[Path] = set()  # data dirs without a manifest already warned about
_VERIFIED: dict[tuple, str] = {}  # (path, size, mtime_ns, inode) -> sha256 already checked


def _stamp(p: Path) -> tuple:
    st = p.stat()
    return (str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


def _verified_sha(p: Path) -> str:
    key = _stamp(p)
    if key in _VERIFIED:
        return _VERIFIED[key]
    from .datasets import _file_sha256

    return _file_sha256(p)


def _manifest_entry(dataset: str, split: str, data_dir, p: Path) -> dict:
    d = _data_dir(data_dir)
    entry = manifest(data_dir).get("datasets", {}).get(dataset, {}).get(split)
    if not isinstance(entry, dict):
        raise MissingDatasetError(
            f"{p} is not recorded in {d / 'manifest.json'} (no {dataset}/{split} entry), so its content cannot "
            f"be checked: re-run `t2eval prepare-data --out {d} --datasets {dataset}`")
    return entry


def manifest(data_dir: str | os.PathLike | None = None) -> dict:
    """`<data_dir>/manifest.json` ({"datasets": {name: {split: {path, rows, sha256, source, version}}}})."""
    import json

    d = _data_dir(data_dir)
    p = d / "manifest.json"
    if not p.is_file():
        raise MissingDatasetError(f"{p} does not exist: run `t2eval prepare-data --out {d}` first")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise T2EvalError(f"{p}:{e.lineno}: corrupt manifest ({e.msg}); re-run "
                          f"`t2eval prepare-data --out {d} --force`") from None
