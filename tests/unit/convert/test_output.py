"""Conversion outputs: whole or absent, replaced only with overwrite, re-verifiable."""
import json

import pytest

from rasa_megatron.convert.output import MANIFEST, check_output, staged_output


def _write(directory, payload=b"w" * 64):
    (directory / "model.safetensors").write_bytes(payload)
    (directory / "sub").mkdir()
    (directory / "sub" / "config.json").write_text("{}")


def test_a_finished_output_carries_a_manifest_that_check_verifies(tmp_path):
    target = tmp_path / "merged"
    with staged_output(target, {"checkpoint": "ckpt", "layout": {"tp": 2}}) as staging:
        assert staging.parent == tmp_path and staging != target and not target.exists()
        _write(staging)
    manifest = json.loads((target / MANIFEST).read_text())
    assert sorted(manifest["files"]) == ["model.safetensors", "sub/config.json"]
    assert manifest["files"]["model.safetensors"]["size"] == 64 and manifest["source"]["layout"] == {"tp": 2}
    assert manifest["tool"].startswith("rasa_megatron ") and check_output(target) == []
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temporary left
    data = bytearray((target / "model.safetensors").read_bytes())
    data[10] ^= 1  # one flipped bit
    (target / "model.safetensors").write_bytes(bytes(data))
    assert check_output(target) == [f"{target / 'model.safetensors'} does not match its sha256 in the manifest"]
    (target / "extra.bin").write_bytes(b"?")
    assert f"{target / 'extra.bin'} is not in the manifest" in check_output(target)
    (target / MANIFEST).unlink()
    assert "is missing or unreadable" in check_output(target)[0]


def test_a_failure_mid_write_leaves_no_output_and_no_temporary(tmp_path):
    target = tmp_path / "merged"
    with pytest.raises(OSError, match="disk full"):
        with staged_output(target, {}) as staging:
            _write(staging)
            raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_replaced_only_with_overwrite(tmp_path):
    target = tmp_path / "adapter"
    with staged_output(target, {"n": 1}) as staging:
        _write(staging, b"1")
    with pytest.raises(FileExistsError, match=r"adapter exists; pass --overwrite"):
        with staged_output(target, {"n": 2}):
            pytest.fail("must not start")
    with pytest.raises(RuntimeError):  # a failed replacement keeps the old output whole
        with staged_output(target, {"n": 2}, overwrite=True) as staging:
            _write(staging, b"2")
            raise RuntimeError
    assert (target / "model.safetensors").read_bytes() == b"1" and check_output(target) == []
    with staged_output(target, {"n": 2}, overwrite=True) as staging:
        _write(staging, b"2")
    assert (target / "model.safetensors").read_bytes() == b"2" and check_output(target) == []
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_several_outputs_appear_together_or_not_at_all(tmp_path, monkeypatch):
    """The last rename failing (disk full) puts back every target as it was: the replaced old output
    restored, the new ones removed, no temporary left; overlapping outputs are refused up front."""
    import os

    from rasa_megatron.convert import output

    old = tmp_path / "peft"
    with staged_output(old, {"n": 1}) as staging:
        _write(staging, b"old")
    targets = {"merged": tmp_path / "merged", "adapter": tmp_path / "adapter", "peft": old}
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 4:  # merged, adapter in place; peft set aside; its new copy fails
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(output.os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        with output.staged_outputs(targets, {}, overwrite=True) as staged:
            for directory in staged.values():
                _write(directory, b"new")
    monkeypatch.setattr(output.os, "replace", real_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]
    assert (old / "model.safetensors").read_bytes() == b"old" and check_output(old) == []
    for nested in ({"a": tmp_path / "x", "b": tmp_path / "x" / "adapter"}, {"a": tmp_path / "x", "b": tmp_path / "x"}):
        with pytest.raises(ValueError, match="inside"):
            with output.staged_outputs(nested, {}):
                pytest.fail("must not start")
    with pytest.raises(ValueError, match="overlaps the input"):
        with output.staged_outputs({"a": tmp_path / "ckpt" / "hf"}, {}, inputs=[tmp_path / "ckpt"]):
            pytest.fail("must not start")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]
