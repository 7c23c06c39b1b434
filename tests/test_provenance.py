"""The provenance record every artefact carries."""

from __future__ import annotations

import json

from t2eval import provenance


def test_record_has_every_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"a": 1}\n')
    rec = provenance.record("unit", {"b": 2, "a": 1}, seeds={"torch": 7}, data_files=[f], timings={"x_s": 1.5})
    for key in ("config", "config_sha256", "code", "packages", "data", "seeds", "host", "device", "timings", "created"):
        assert key in rec
    assert len(rec["data"][str(f)]) == 64
    assert rec["packages"]["torch"].startswith("2.")
    assert rec["seeds"] == {"torch": 7}
    assert rec["code"]["commit"] == "unknown" or len(rec["code"]["commit"]) == 40
    # config hash is order independent and changes with the config
    assert rec["config_sha256"] == provenance.record("unit", {"a": 1, "b": 2})["config_sha256"]
    assert rec["config_sha256"] != provenance.record("unit", {"a": 1, "b": 3})["config_sha256"]


def test_sha256_matches_hashlib(tmp_path):
    import hashlib

    f = tmp_path / "x.bin"
    f.write_bytes(b"t2eval" * 1000)
    assert provenance.sha256_file(f) == hashlib.sha256(b"t2eval" * 1000).hexdigest()
    f.write_bytes(b"changed!")  # cache keyed by mtime/size: a change is seen
    assert provenance.sha256_file(f) == hashlib.sha256(b"changed!").hexdigest()


def test_sidecar_for_file_and_dir(tmp_path):
    f = tmp_path / "z.safetensors"
    f.write_bytes(b"0")
    p = provenance.write_sidecar(f, {"stage": "t"})
    assert p.name == "z.safetensors.provenance.json" and json.loads(p.read_text())["stage"] == "t"
    d = tmp_path / "adapter"
    d.mkdir()
    assert provenance.write_sidecar(d, {"stage": "u"}) == d / "provenance.json"
    assert not list(tmp_path.glob(".*.tmp*"))  # atomic writes leave no temp files
