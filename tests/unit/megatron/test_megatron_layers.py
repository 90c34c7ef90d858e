"""Single-process checks of the Megatron-side RaSA factors (no process group needed)."""
import pytest
import torch

from rasa_megatron.megatron.layers import ShardedRaSA
from rasa_megatron.megatron.pools import ShardedRankPool
from rasa_megatron.megatron.sharding import COLUMN, ROW, shard_of


def test_shards_of_the_single_process_init_concatenate_to_it():
    full = [ShardedRankPool(12, 8, 4, 2, ROW, 0, 1, generator=torch.Generator().manual_seed(0))]
    shards = [ShardedRankPool(12, 8, 4, 2, ROW, rank, 3, generator=torch.Generator().manual_seed(0)) for rank in range(3)]
    assert torch.equal(torch.cat([s.A_shared for s in shards], dim=1), full[0].A_shared)
    column = ShardedRaSA(12, 8, 3, None, 8.0, COLUMN, 1, 2, generator=torch.Generator().manual_seed(1))
    assert column.A_private.shape == (3, 12) and column.B_private.shape == (4, 3)
    assert torch.all(column.diag == 8.0 / 6) and torch.all(column.B_private == 0)


@pytest.mark.parametrize("parallel,in_f,out_f,bad", [(COLUMN, 16, 10, "out_features = 10"),
                                                      (ROW, 10, 16, "in_features = 10")])
def test_tensor_parallel_size_must_divide_the_sharded_dim(parallel, in_f, out_f, bad):
    with pytest.raises(ValueError, match=rf"{bad} is not divisible by tensor-parallel size = 4.*\[1, 2, 5, 10\]"):
        ShardedRaSA(in_f, out_f, 2, None, 8.0, parallel, 0, 4)
    with pytest.raises(ValueError, match=rf"{bad} is not divisible by tensor-parallel size = 4"):
        ShardedRankPool(in_f, out_f, 2, 2, parallel, 0, 4)
    with pytest.raises(ValueError, match="parallel must be"):
        ShardedRankPool(in_f, out_f, 2, 2, "diagonal", 0, 1)


def test_shard_of_splits_contiguously():
    t = torch.arange(12.).reshape(3, 4)
    assert torch.equal(shard_of(t, 1, 1, 2), t[:, 2:])


@pytest.mark.parametrize("flag", ["overlap_grad_reduce", "overlap_param_gather"])
def test_overlapped_megatron_ddp_is_refused_before_any_collective(flag):
    """RaSA completes pool/TP-partial grads after the backward and reads pool slices before the first
    forward, so Megatron DDP's overlapped grad reduction / param gather would race it: refused."""
    from megatron.core.distributed import DistributedDataParallelConfig

    from rasa_megatron.megatron import check_megatron_ddp, gather_pipeline_pools

    chunk = torch.nn.Linear(2, 2)  # stands for a DDP-wrapped chunk: only its ddp_config is read
    chunk.ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, **{flag: True})
    with pytest.raises(ValueError, match=rf"{flag}=True\) is not supported with RaSA adapters"):
        gather_pipeline_pools([chunk])
    chunk.ddp_config = DistributedDataParallelConfig()
    check_megatron_ddp([chunk])
    assert gather_pipeline_pools([chunk]) == 0  # no pools: nothing to gather
