"""The checkpoint layer both engines share (single process): the save protocol, manifests, verification
and fallback, full-disk failures, pruning, pickle-free state files, run identities, finished runs and
stop requests."""
import errno
import json
import os
import random
import signal

import numpy as np
import pytest
import torch

from rasa_megatron.training import state_io
from rasa_megatron.training.checkpoint import (CheckpointWriteError, checkpoint_tags, save_checkpoint_dir,
                                               select_checkpoint, set_aside_newer_checkpoints, verify_checkpoint)
from rasa_megatron.training.control import StopRequest
from rasa_megatron.training.identity import (check_resume_identity, completed_step, mark_complete,
                                             write_run_record)
from rasa_megatron.training.loop import resume_directory, stop_file_path
from rasa_megatron.training.recipe import Recipe
from rasa_megatron.training.state_io import load_state, save_state


def _writer(payload: bytes):
    def write(directory):
        state_io.write_bytes_durably(directory / "weights.bin", payload)
        save_state(directory, "state", {"step": len(payload), "x": torch.arange(4.0)})
    return write


def test_save_protocol_writes_a_verified_checkpoint_then_latest(tmp_path):
    final = save_checkpoint_dir(tmp_path, 2, _writer(b"a" * 100))
    assert final == tmp_path / "step0000002" and (tmp_path / "latest").read_text() == "step0000002"
    manifest = json.loads((final / "manifest.json").read_text())["files"]
    assert sorted(manifest) == ["state.json", "state.safetensors", "weights.bin"]
    assert manifest["weights.bin"]["size"] == 100 and verify_checkpoint(final) == []
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary left behind


def test_a_torn_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    save_checkpoint_dir(tmp_path, 2, _writer(b"a" * 100))
    newest = save_checkpoint_dir(tmp_path, 4, _writer(b"b" * 100))
    data = (newest / "weights.bin").read_bytes()
    (newest / "weights.bin").write_bytes(data[:50])  # half of the file: a torn copy
    assert verify_checkpoint(newest) == [f"{newest / 'weights.bin'} has 50 bytes, the manifest says 100"]
    assert select_checkpoint(tmp_path) == tmp_path / "step0000002"
    assert "skipping damaged checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"cannot resume from .*step0000004.*weights.bin has 50 bytes"):
        select_checkpoint(newest)  # asked for by path: refused, naming the bad file
    (newest / "weights.bin").write_bytes(b"c" * 100)  # same size, other bytes
    assert "does not match its sha256" in verify_checkpoint(newest)[0]
    (newest / "manifest.json").write_text('{"files": {"weights.bin": {"size": 100}}}')  # an entry without sha256
    assert "weights.bin cannot be checked (KeyError" in verify_checkpoint(newest)[0]  # a problem, not a crash
    (newest / "manifest.json").unlink()  # a save interrupted before its manifest
    assert "manifest.json is missing" in verify_checkpoint(newest)[0]


def test_resume_choice_sets_newer_checkpoints_aside_and_refuses_what_cannot_continue(tmp_path, capsys):
    recipe = Recipe()
    recipe.output.dir = str(tmp_path)
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        save_checkpoint_dir(root, step, _writer(bytes([step]) * 10))
    with pytest.raises(SystemExit, match=r"cannot resume from .*step0000006: it is past step 5"):
        resume_directory(recipe, "latest", stop=5)  # a shorter run would write step 6's state as step 5
    (tmp_path / "complete.json").write_text("{}")
    assert resume_directory(recipe, str(root / "step0000002"), stop=8) == root / "step0000002"
    assert not (tmp_path / "complete.json").exists()  # this run rewrites it when it finishes
    assert checkpoint_tags(root) == ["step0000002"]  # 4 and 6 belong to the abandoned line
    assert sorted(p.name for p in root.glob("abandoned.*")) == ["abandoned.step0000004", "abandoned.step0000006"]
    assert "newer than the checkpoint resumed from" in capsys.readouterr().err
    assert set_aside_newer_checkpoints(root, "step0000002") == []
    save_checkpoint_dir(root, 4, _writer(b"n" * 10), keep_last=1)  # the resumed line's own step 4
    assert checkpoint_tags(root) == ["step0000004"] and (root / "step0000004" / "weights.bin").read_bytes() == b"n" * 10
    (root / "step0000004" / "weights.bin").write_bytes(b"torn")
    with pytest.raises(SystemExit, match=r"no intact checkpoint under .*move the damaged ones aside"):
        resume_directory(recipe, "auto", stop=8)  # only damaged ones: not a silent fresh start
    (root / "step0000004").rename(tmp_path / "inspect_me")
    assert resume_directory(recipe, "auto", stop=8) is None  # no checkpoint at all: a fresh start
    assert resume_directory(recipe, None, stop=8) is None


def test_prune_never_removes_a_checkpoint_newer_than_the_one_written(tmp_path):
    for step in (2, 4, 6):
        save_checkpoint_dir(tmp_path, step, _writer(b"x" * 10))
    (tmp_path / ".step0000008.tmp").mkdir()  # a save killed earlier: removed by the next save
    save_checkpoint_dir(tmp_path, 3, _writer(b"y" * 10), keep_last=1)
    assert checkpoint_tags(tmp_path) == ["step0000003", "step0000006", "step0000004"]
    assert not list(tmp_path.glob(".step*"))


def test_a_stale_stop_file_is_removed_and_a_new_one_kept(tmp_path):
    recipe = Recipe()
    recipe.output.dir = str(tmp_path)
    stop = tmp_path / "STOP"
    stop.touch()
    os.utime(stop, (1e9, 1e9))  # 2001: older than this process, left by the run being resumed
    assert stop_file_path(recipe, None) == stop and not stop.exists()
    stop.touch()  # made while this run starts up (a signal trapped by the batch script): honoured
    assert stop_file_path(recipe, None) == stop and stop.exists()


def test_a_full_disk_leaves_the_previous_checkpoint_and_names_the_space_needed(tmp_path, monkeypatch):
    save_checkpoint_dir(tmp_path, 2, _writer(b"a" * 1000), keep_last=1)
    written = {"bytes": 0}
    original = state_io._write

    def full_disk(handle, data):  # the disk fills after 1500 more bytes
        if written["bytes"] + len(data) > 1500:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written["bytes"] += len(data)
        original(handle, data)

    monkeypatch.setattr(state_io, "_write", full_disk)
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint .*step0000004 \(rank 0: \[Errno 28\] "
                                                   r"No space left on device\).*step0000002 and .*latest are intact"
                                                   r".*takes about 0\.0 MiB; [\d.]+ MiB are free"):
        save_checkpoint_dir(tmp_path, 4, _writer(b"b" * 2000), keep_last=1)
    assert checkpoint_tags(tmp_path) == ["step0000002"] and (tmp_path / "latest").read_text() == "step0000002"
    assert not list(tmp_path.glob(".step*")) and verify_checkpoint(tmp_path / "step0000002") == []


def test_keep_last_prunes_only_after_a_new_checkpoint_is_verified(tmp_path):
    for step in (2, 4, 6):
        save_checkpoint_dir(tmp_path, step, _writer(b"x" * 10), keep_last=2)
    assert checkpoint_tags(tmp_path) == ["step0000006", "step0000004"]


def test_state_files_round_trip_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "nested": [1, (2.5, None), {"a": "b"}]}
    save_state(tmp_path, "s", state)
    back = load_state(tmp_path, "s")
    assert back["python"] == random.getstate() and back["nested"] == [1, (2.5, None), {"a": "b"}]
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], np.random.get_state()[1])
    assert back["numpy"][1].dtype == np.uint32 and torch.equal(back["torch"], torch.get_rng_state())
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    fresh.load_state_dict(back["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert b"\x80" not in (tmp_path / "s.json").read_bytes()  # plain JSON, no pickle stream
    with pytest.raises(TypeError, match=r"s.x: object cannot be stored"):
        save_state(tmp_path, "bad", {"x": object()})


def _identity(**changes):
    identity = {"recipe": {"train.global_batch_size": 192, "adapter.r": 16}, "model_sha256": "a" * 64,
                "data_sha256": "b" * 64}
    for key, value in changes.items():
        if key in identity:
            identity[key] = value
        else:
            identity["recipe"][key] = value
    return identity


def test_resuming_another_run_is_refused_naming_what_differs(tmp_path):
    write_run_record(tmp_path, Recipe(), _identity(), 7, {"world_size": 2})
    check_resume_identity(tmp_path, _identity())
    cases = {"train.global_batch_size": (384, r"train.global_batch_size 192 -> 384"),
             "adapter.r": (8, r"adapter.r 16 -> 8"),
             "model_sha256": ("c" * 64, r"model \(config and weight files, sha256\) aaaaaaaaaaaa -> cccccccccccc"),
             "data_sha256": ("d" * 64, r"tokenised data \(sha256\) bbbbbbbbbbbb -> dddddddddddd")}
    for key, (value, message) in cases.items():
        with pytest.raises(SystemExit, match=message):
            check_resume_identity(tmp_path, _identity(**{key: value}))


def test_a_checkpoint_describes_itself_for_the_converters(tmp_path):
    """checkpoint.json: format version, engine, layout, step, the RaSA config and the base model's identity."""
    from rasa_megatron import RaSAConfig
    from rasa_megatron.training.identity import DESCRIPTION_FILE

    recipe = Recipe()
    recipe.engine, recipe.model.path = "megatron", "/models/Llama"
    write_run_record(tmp_path, recipe, {**_identity(), "config_sha256": "e" * 64}, 7, {"world_size": 4})
    described = json.loads((tmp_path / DESCRIPTION_FILE).read_text())
    assert described["format"] == "rasa_megatron.checkpoint" and described["format_version"] == 1
    assert (described["engine"], described["step"], described["layout"]) == ("megatron", 7, {"world_size": 4})
    assert RaSAConfig.from_dict(described["rasa_config"]) == recipe.rasa_config()
    assert described["base_model"]["path"] == "/models/Llama"
    assert (described["base_model"]["config_sha256"], described["base_model"]["model_sha256"]) == ("e" * 64, "a" * 64)
    recipe.adapter.method = "full"
    write_run_record(tmp_path, recipe, _identity(), 7, {})
    assert json.loads((tmp_path / DESCRIPTION_FILE).read_text())["rasa_config"] is None


def test_a_finished_run_is_recognised_by_its_recipe(tmp_path):
    recipe = Recipe()
    recipe.output.dir = str(tmp_path)
    assert completed_step(recipe) is None
    mark_complete(tmp_path, recipe, 24)
    assert completed_step(recipe) == 24
    recipe.train.lr = 1e-4  # does not change what the run is
    assert completed_step(recipe) == 24
    recipe.train.epochs = 16  # a longer run: not finished
    assert completed_step(recipe) is None
    recipe.train.epochs = Recipe().train.epochs
    recipe.data.paths = ["other.jsonl"]  # other data: not this run (the resume checks then decide)
    assert completed_step(recipe) is None


def test_stop_requests_come_from_signals_a_stop_file_or_the_time_budget(tmp_path):
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        stop = StopRequest(["SIGUSR1"], tmp_path / "STOP")
        assert not stop.agreed()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.agreed() and stop.reason == "signal SIGUSR1"
        by_file = StopRequest([], tmp_path / "STOP")
        (tmp_path / "STOP").touch()
        assert by_file.agreed() and by_file.reason.startswith("stop file")
        assert StopRequest([], None, max_minutes=1e-9).agreed()
        stop.close()  # the loop's end: the handler before the request is back
        assert signal.getsignal(signal.SIGUSR1) is previous
    finally:
        signal.signal(signal.SIGUSR1, previous)
    with pytest.raises(ValueError, match=r"'SIGKILL' is not a signal a process can catch"):
        StopRequest(["SIGKILL"])
