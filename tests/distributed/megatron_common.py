"""Shared set-up of the Megatron CPU workers: process groups, CPU shims, the tiny HF Llama with a
RaSA adapter (the single-process reference) and this rank's Megatron GPTModel chunks."""
from types import SimpleNamespace

import torch
import torch.distributed as dist

LAYERS, R, K = 4, 4, 1


def init_cpu_megatron(tp: int, pp: int, vpp: int = 1, **parallel):
    """gloo process group + Megatron parallel state on a CPU-only torch."""
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    from megatron.core import parallel_state

    from rasa_megatron.megatron.cpu_compat import enable_cpu_megatron

    enable_cpu_megatron()  # CPU-only torch: Megatron's CUDA device references -> CPU (documented there)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None, **parallel)
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(1234)  # Megatron's RNG tracker, as a GPU run seeds it
    return parallel_state


def close_cpu_megatron() -> None:
    """The end of every worker :func:`init_cpu_megatron` set up: all ranks meet, then the process groups
    are destroyed, so that no rank's interpreter exit tears gloo down with work still queued (a rank
    aborts with SIGABRT there, after the worker printed its result)."""
    dist.barrier()
    dist.destroy_process_group()


def hf_reference(adapter_seed: int = 7, noise_seed: int = 1):
    """The tiny HF Llama (base weights seed 0) with RaSA r=4 k=1 (init after ``adapter_seed``) plus
    seeded noise on every adapter tensor, so B is non-zero."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rasa_megatron import RaSAConfig, adapter_state_dict, apply_rasa

    hf_config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                            tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_config).eval()
    base_state = {key: value.clone() for key, value in hf.state_dict().items()}
    rasa = RaSAConfig(r=R, k=K, alpha=8)
    torch.manual_seed(adapter_seed)
    apply_rasa(hf, rasa)
    init_adapter = {key: p.detach().clone() for key, p in adapter_state_dict(hf).items()}
    gen = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for p in adapter_state_dict(hf).values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return SimpleNamespace(model=hf, config=hf_config, base_state=base_state, rasa=rasa, init_adapter=init_adapter)


def megatron_chunks(ref, parallel_state, tp: int, pp: int, vpp: int = 1, sp: bool = False, adapter_seed: int = 7,
                    spec: bool = False):
    """This rank's GPTModel chunks with the reference's base weights and a fresh RaSA (init after
    ``adapter_seed``): put in after building (``apply_rasa_megatron``) or, with ``spec``, built from
    ``rasa_layer_spec`` (a new spec per chunk, as Megatron-LM's model_provider makes them)."""
    from rasa_megatron.megatron import apply_rasa_megatron, freeze_base_parameters, rasa_layer_spec
    from rasa_megatron.convert.megatron_weights import hf_to_megatron, transformer_config_from_hf
    from rasa_megatron.megatron.model import build_gpt_model

    tp_rank, pp_rank = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
    tconfig = transformer_config_from_hf(ref.config, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                         sequence_parallel=sp,
                                         **({"virtual_pipeline_model_parallel_size": vpp} if vpp > 1 else {}))
    chunks = []
    for v in range(vpp):
        transform = (lambda block: rasa_layer_spec(block, ref.rasa, seed=adapter_seed)) if spec else None
        model = build_gpt_model(tconfig, ref.config, pre_process=pp_rank == 0 and v == 0,
                                post_process=pp_rank == pp - 1 and v == vpp - 1, vp_stage=v if vpp > 1 else None,
                                spec_transform=transform)
        state = hf_to_megatron(ref.base_state, ref.config, tp_rank, tp, pp_rank, pp, v, vpp)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not m.endswith("_extra_state") and not (spec and _is_rasa_key(m))]
        assert not missing and not unexpected, (missing, unexpected)
        chunks.append(model)
    if spec:
        freeze_base_parameters(chunks)
    else:
        torch.manual_seed(adapter_seed)
        apply_rasa_megatron(chunks, ref.rasa)
    return chunks


def _is_rasa_key(key: str) -> bool:
    return ".adapter." in key or ".adapters." in key or ".rasa_pools." in key


def micro_batches(vocab: int, count: int = 2, batch: int = 2, seq: int = 12):
    data = torch.randint(0, vocab, (count, batch, seq + 1), generator=torch.Generator().manual_seed(3))
    return [{"input_ids": d[:, :-1], "labels": d[:, 1:], "position_ids": torch.arange(seq).expand(batch, seq)}
            for d in data]


def report_worst(worst: dict) -> dict:
    """The worst differences over all ranks."""
    for kind in worst:
        value = torch.tensor(worst[kind], dtype=torch.float64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        worst[kind] = value.item()
    return worst
