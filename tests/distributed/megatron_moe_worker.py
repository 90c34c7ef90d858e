"""torchrun worker: Megatron MoE GPTModel (SequentialMLP experts, expert parallel 2) with RaSA on
attention and on every expert's fc1/fc2 against HF Mixtral with RaSA (rasa_megatron.experts) on the
same weights: adapter init identical after the same seed (same pool grouping: one pool per expert
index across layers), logits, loss and every adapter gradient within 1e-5 (fp32).

Two processes, TP=1, EP=2: each rank runs its own batch (data parallel for the dense part, as
Megatron's DDP would, so the dense adapter gradients are summed over ranks here), the all-gather
token dispatcher sends tokens to the rank owning their expert. Prints ``RESULT {json}`` on rank 0.
``--spec``: the model is built from ``rasa_layer_spec`` instead of adapted after building.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from megatron_common import close_cpu_megatron, init_cpu_megatron, report_worst  # noqa: E402

TOL = 1e-5


def main():
    ep = 2
    spec = "--spec" in sys.argv[1:]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    parallel_state = init_cpu_megatron(1, 1, expert_model_parallel_size=ep)
    from transformers import MixtralConfig, MixtralForCausalLM

    from rasa_megatron import RaSAConfig, adapter_state_dict, apply_rasa
    from rasa_megatron.megatron import apply_rasa_megatron, freeze_base_parameters, megatron_rasa_units, rasa_layer_spec
    from rasa_megatron.convert.megatron_weights import hf_to_megatron, transformer_config_from_hf
    from rasa_megatron.megatron.model import build_gpt_model
    from rasa_megatron.megatron.hf_adapter import gather_hf_adapter, load_hf_adapter_, pieces_to_send

    hf_config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                              num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = MixtralForCausalLM(hf_config).eval()
    base_state = {key: value.clone() for key, value in hf.state_dict().items()}
    rasa = RaSAConfig(r=4, k=1, alpha=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                      target_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))
    torch.manual_seed(7)
    apply_rasa(hf, rasa)
    init_adapter = {key: p.detach().clone() for key, p in adapter_state_dict(hf).items()}
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in adapter_state_dict(hf).values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)

    tconfig = transformer_config_from_hf(hf_config, expert_model_parallel_size=ep)
    model = build_gpt_model(tconfig, hf_config,
                            spec_transform=(lambda block: rasa_layer_spec(block, rasa, seed=7)) if spec else None)
    state = hf_to_megatron(base_state, hf_config, 0, 1, ep_rank=parallel_state.get_expert_model_parallel_rank(),
                           ep_size=ep)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m.endswith("_extra_state") or ".adapter" in m or "rasa_pools" in m)]
    assert not missing and not unexpected, (missing, unexpected)
    if spec:
        freeze_base_parameters(model)
    else:
        torch.manual_seed(7)
        apply_rasa_megatron([model], rasa)
    units = megatron_rasa_units([model])
    worst = {"init": 0.0, "logits": 0.0, "loss": 0.0, "grad": 0.0}

    def check(kind, got, want, what):
        diff = (got.float() - want.float()).abs().max().item()
        worst[kind] = max(worst[kind], diff)
        if diff > TOL:
            raise AssertionError(f"rank {rank}: {what} differs by {diff:.3g}")

    def compare(kind, reference, grads):
        for key, unit in sorted(units.items(), key=str):
            index, path = key[:2]
            expert = key[2] if len(key) == 3 else None

            def want(name):
                t = reference[name]
                return t if expert is None else t[expert]

            for name in ("A_private", "B_private", "diag"):
                t = getattr(unit, name)
                check(kind, t.grad if grads else t.detach(), want(f"model.layers.{index}.{path}.{name}"),
                      f"{kind} {key} {name}")
            for name in ("A_shared", "B_shared"):
                t = getattr(unit.pool, name)
                check(kind, t.grad if grads else t.detach(), want(f"rasa_pools.{path}.{name}"), f"{kind} {key} {name}")

    compare("init", init_adapter, grads=False)
    load_hf_adapter_([model], {key: p.detach() for key, p in adapter_state_dict(hf).items()})
    assembled = gather_hf_adapter([model])  # Megatron -> HF adapter, experts stacked again
    sent = pieces_to_send([model])  # what this rank contributed: (dense, expert) piece counts
    sent_by_rank = [None] * dist.get_world_size()
    dist.all_gather_object(sent_by_rank, [sum(p[6] is None for p in sent), sum(p[6] is not None for p in sent)])
    round_trip = None
    if assembled is not None:
        reference = adapter_state_dict(hf)
        assert set(assembled) == set(reference), sorted(set(assembled) ^ set(reference))[:4]
        round_trip = max((assembled[key] - reference[key].detach()).abs().max().item() for key in reference)

    seq, batch = 10, 2
    data = [torch.randint(0, 64, (batch, seq + 1), generator=torch.Generator().manual_seed(10 + r)) for r in range(ep)]
    hf.train()
    ref_logits = []
    for r in range(ep):  # the reference sees every rank's batch: loss = mean over ranks of the token mean
        logits = hf(input_ids=data[r][:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), data[r][:, 1:].reshape(-1))
        (loss / ep).backward()
        ref_logits.append((logits.detach(), loss.detach()))
    ref_grads = {key: p.grad.clone() for key, p in adapter_state_dict(hf).items()}

    model.train()
    mine = data[rank]
    positions = torch.arange(seq).expand(batch, seq)
    with torch.no_grad():
        logits = model(mine[:, :-1], positions, None)
    check("logits", logits, ref_logits[rank][0], "logits")
    per_token = model(mine[:, :-1], positions, None, labels=mine[:, 1:])
    loss = per_token.float().mean()
    check("loss", loss, ref_logits[rank][1], "loss")
    (loss / ep).backward()
    with torch.no_grad():  # data-parallel sum of the dense adapter gradients (Megatron's DDP does this)
        dp_group = parallel_state.get_data_parallel_group()
        for key, unit in units.items():
            if len(key) == 2:
                for param in (unit.A_private, unit.B_private, unit.diag, unit.pool.A_shared, unit.pool.B_shared):
                    if not getattr(param, "_dp_summed", False):
                        dist.all_reduce(param.grad, group=dp_group)
                        param._dp_summed = True
    compare("grad", ref_grads, grads=True)
    report_worst(worst)
    if rank == 0:
        print("RESULT " + json.dumps({"ep": ep, "worst": worst, "units": len(units),
                                      "expert_units": sum(len(k) == 3 for k in units),
                                      "adapter_round_trip": round_trip, "pieces_sent": sent_by_rank}), flush=True)
    close_cpu_megatron()


if __name__ == "__main__":
    sys.exit(main())
