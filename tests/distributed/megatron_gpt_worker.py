"""torchrun worker: a Megatron-core GPTModel (local spec, CPU attention) under tensor parallelism on
gloo, base weights from the HF converter, against the single-process HF LlamaForCausalLM logits.

Every rank builds the same tiny HF Llama (same seed), loads its TP shard, runs the forward, and
all-gathers its vocab-parallel logits ``[b, s, vocab / tp]``; Megatron's own gather
(``runtime_gather_output``) must give the same tensor. Untied and tied embeddings, each without and
with sequence parallelism. Prints one ``RESULT {json}`` line on rank 0; exits non-zero on a mismatch.
Usage: torchrun --standalone --nproc_per_node 2 megatron_gpt_worker.py
"""
import itertools
import json
import sys

import torch
import torch.distributed as dist

TOL = 1e-5  # fp32 on both sides
SEQ, BATCH = 12, 2


def hf_llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                         tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    torch.manual_seed(0)
    return config, LlamaForCausalLM(config).eval()


def all_gather_last_dim(local: torch.Tensor, group) -> torch.Tensor:
    """``[..., v / tp]`` on every TP rank -> ``[..., v]`` (rank order)."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def main():
    dist.init_process_group("gloo")
    from megatron.core import parallel_state

    from rasa_megatron.convert.megatron_weights import hf_to_megatron, transformer_config_from_hf
    from rasa_megatron.megatron.model import build_gpt_model
    from rasa_megatron.megatron.cpu_compat import enable_cpu_megatron

    # Test shim (CPU-only torch), the one the Megatron trainer uses on CPU: Megatron's RotaryEmbedding
    # moves its inverse frequencies to torch.cuda.current_device() on the first forward, its
    # sequence-parallel all-gather / reduce-scatter allocate their outputs there, and under sequence
    # parallelism its TransformerBlock forks the CUDA RNG tracker; each is redirected to the CPU /
    # the default generator. The layers and collectives that run are Megatron's own, on gloo.
    enable_cpu_megatron()

    tp = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(1234)  # Megatron's RNG tracker, as a GPU run seeds it
    rank, group = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_group()
    worst, local_vocab = {}, None
    for tied, sequence_parallel in itertools.product((False, True), (False, True)):
        hf_config, hf = hf_llama(tied)
        ids = torch.randint(0, hf_config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
        positions = torch.arange(SEQ).expand(BATCH, SEQ)
        tconfig = transformer_config_from_hf(hf_config, tensor_model_parallel_size=tp,
                                             sequence_parallel=sequence_parallel)
        model = build_gpt_model(tconfig, hf_config).eval()
        missing, unexpected = model.load_state_dict(hf_to_megatron(hf.state_dict(), hf_config, rank, tp), strict=False)
        missing = [m for m in missing if not m.endswith("_extra_state")]
        if missing or unexpected:
            raise AssertionError(f"rank {rank}: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            want = hf(ids).logits
            local = model(ids, positions, None)  # vocab-parallel [b, s, v / tp]
            gathered = all_gather_last_dim(local, group)
            megatron_gathered = model(ids, positions, None, runtime_gather_output=True)
        local_vocab = local.shape[-1]
        if not torch.equal(megatron_gathered, gathered):
            raise AssertionError(f"rank {rank}: runtime_gather_output differs from the all-gathered shards")
        name = ("tied" if tied else "untied") + ("_sp" if sequence_parallel else "")
        worst[name] = (gathered - want).abs().max().item()
        if worst[name] > TOL:
            raise AssertionError(f"rank {rank}: {name} logits differ from HF by {worst[name]:.3g}")
    for name in worst:  # the worst over all ranks
        value = torch.tensor(worst[name], dtype=torch.float64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        worst[name] = value.item()
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"tp": tp, "local_vocab": local_vocab, "worst": worst}), flush=True)
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
