"""Which module's ZeRO-3 hooks fetch each RaSA pool (the sparse-MoE block once it is a ZeRO-3 leaf)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
from test_experts import rasa_mixtral  # noqa: E402


def test_zero3_pool_reader_is_the_leaf_moe_block():
    from deepspeed.utils import set_z3_leaf_modules

    from rasa_megatron.deepspeed.zero3 import pool_readers

    model = rasa_mixtral(target_modules=("q_proj",))
    readers = {type(reader).__name__ for reader, _ in pool_readers(model)}
    assert readers == {"RaSALinear", "RaSAExperts"}
    set_z3_leaf_modules(model, [type(model.model.layers[0].mlp)])
    readers = {type(reader).__name__ for reader, _ in pool_readers(model)}
    assert readers == {"RaSALinear", "MixtralSparseMoeBlock"}
