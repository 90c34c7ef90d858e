"""Offline reading of Megatron-engine checkpoints: assembly of the HF adapter from rank pieces, and the
errors for incomplete checkpoints (the engine-written cases are in tests/distributed/test_megatron_engine.py)."""
import json

import pytest
import torch
from safetensors.torch import save_file

from rasa_megatron.convert.megatron_checkpoint import adapter_from_megatron_checkpoint, assemble_hf_adapter


def _pieces():
    """A column adapter B split over 2 TP ranks, a pool split over 2 pipeline stages (rows 0-1, 2-3), and
    an expert tensor on 2 expert ranks."""
    b = torch.arange(24.0).reshape(6, 4)
    pool = torch.arange(32.0).reshape(4, 8)
    expert = torch.arange(12.0).reshape(2, 3, 2)
    rank0 = [("l.0.q.B_private", b[:3], 0, 0, None, None, None), ("pool.q.A_shared", pool[:2], None, 0, [0, 1], 0, None),
             ("l.0.e.A_private", expert[0], None, 0, None, None, 0)]
    rank1 = [("l.0.q.B_private", b[3:], 0, 1, None, None, None),
             ("pool.q.A_shared", pool[2:], None, 0, torch.tensor([2, 3]), 0, None),
             ("l.0.e.A_private", expert[1], None, 0, None, None, 1)]
    return [rank0, rank1], {"l.0.q.B_private": b, "pool.q.A_shared": pool, "l.0.e.A_private": expert}


def test_pieces_assemble_into_the_whole_tensors():
    gathered, want = _pieces()
    got = assemble_hf_adapter(gathered)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("drop,message", [(0, r"l.0.q.B_private: tensor-parallel shards \[1\] are incomplete"),
                                          (1, r"pool.q.A_shared: pool rows missing"),
                                          (2, r"l.0.e.A_private: experts \[1\] are incomplete")])
def test_a_missing_piece_is_named(drop, message):
    gathered, _ = _pieces()
    del gathered[0][drop]
    with pytest.raises(ValueError, match=message):
        assemble_hf_adapter(gathered)


def test_a_checkpoint_with_a_missing_rank_file_is_refused_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="layout.json is missing"):
        adapter_from_megatron_checkpoint(tmp_path)
    (tmp_path / "layout.json").write_text(json.dumps({"world_size": 2}))
    (tmp_path / "recipe.json").write_text("{}")
    save_file({"s.adapter.0.x": torch.ones(2)}, tmp_path / "rank00000.safetensors")
    (tmp_path / "rank00000.pieces.json").write_text(json.dumps(
        [{"key": "x", "tensor": "adapter.0.x", "dim": None, "tp_rank": 0, "rows": None, "layer_dim": None,
          "expert": None}]))
    with pytest.raises(FileNotFoundError, match=r"2 ranks but 2 rank files are missing: .*rank00001.safetensors"):
        adapter_from_megatron_checkpoint(tmp_path)
    save_file({"s.adapter.0.y": torch.ones(2)}, tmp_path / "rank00001.safetensors")
    (tmp_path / "rank00001.pieces.json").write_text(json.dumps(
        [{"key": "y", "tensor": "adapter.0.z", "dim": None, "tp_rank": 0, "rows": None, "layer_dim": None,
          "expert": None}]))
    with pytest.raises(ValueError, match=r"rank00001.safetensors has no tensor s.adapter.0.z \(for y\)"):
        adapter_from_megatron_checkpoint(tmp_path)
