"""The streamed merged export (convert/merged.py) and --verify (convert/verify.py) on tiny Llama and Mixtral
checkpoints on disk: bit-exact against ``merge_and_unload`` of the same model in memory, the index built
from the shards written, transformers loading it without missing or unexpected keys, and each error."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from rasa_megatron import RaSAConfig, adapter_state_dict, apply_rasa, merge_and_unload
from rasa_megatron.adapter import hf_model_with_adapter
from rasa_megatron.convert.merged import INDEX_FILE, BaseWeights, parse_size, plan_merged, write_merged
from rasa_megatron.convert.verify import Tolerance, verify_exports

LLAMA = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
MIXTRAL = dict(vocab_size=96, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
DENSE = RaSAConfig(r=4, k=1, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
MOE = RaSAConfig(r=4, k=1, alpha=8, target_modules=("q_proj", "v_proj"),
                 target_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))


def _base(tmp_path, family, dtype, shard="20KB"):
    torch.manual_seed(0)
    model = (LlamaForCausalLM(LlamaConfig(**LLAMA)) if family == "llama"
             else MixtralForCausalLM(MixtralConfig(**MIXTRAL))).to(dtype)
    path = tmp_path / f"base_{family}"
    model.save_pretrained(path, max_shard_size=shard)  # several shards (and Mixtral's per-expert names)
    return path


def _adapter(config_dir, rasa_config):
    """Random adapter tensors of the model in ``config_dir`` (B is zero at init: make the update non-trivial)."""
    from transformers import AutoConfig

    with torch.device("meta"):
        skeleton = apply_rasa(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir)), rasa_config)
    generator = torch.Generator().manual_seed(3)
    return {k: torch.randn(p.shape, generator=generator) * 0.2 for k, p in adapter_state_dict(skeleton).items()}


def _in_memory_merged(base_dir, rasa_config, tensors, dtype):
    from rasa_megatron.adapter import assign_adapter_tensors_

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    return merge_and_unload(assign_adapter_tensors_(apply_rasa(model, rasa_config), tensors))


@pytest.mark.parametrize("family,rasa_config,dtype", [("llama", DENSE, torch.bfloat16), ("llama", DENSE, torch.float32),
                                                      ("mixtral", MOE, torch.bfloat16)])
def test_streamed_merge_equals_merge_and_unload_bit_for_bit(tmp_path, family, rasa_config, dtype):
    base = _base(tmp_path, family, dtype)
    tensors = _adapter(base, rasa_config)
    model = hf_model_with_adapter(str(base), rasa_config, tensors)
    plan = plan_merged(model, base, base, max_shard_size=parse_size("16KB"))
    assert len(plan.shards) > 1
    out = tmp_path / "merged"
    out.mkdir()
    weight_map = write_merged(model, plan, out, progress=False)
    index = json.loads((out / INDEX_FILE).read_text())
    assert index["weight_map"] == weight_map and set(weight_map) == set(BaseWeights(base).file_of)
    assert index["metadata"]["total_size"] == plan.total_bytes
    assert all(plan.shard_bytes[name] <= parse_size("16KB") or len(keys) == 1 for name, keys in plan.shards.items())
    if family == "mixtral":
        assert any(".block_sparse_moe.experts.3.w3.weight" in k for k in weight_map)  # transformers' on-disk names
        assert sum(u.expert is not None for u in plan.updates.values()) == 2 * 4 * 3  # layers x experts x w1/w2/w3
    loaded, info = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    want = _in_memory_merged(base, rasa_config, tensors, dtype).state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    changed = [k for k in want if not torch.equal(got[k], want[k])]
    assert not changed, changed[:4]
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).state_dict()
    assert any(not torch.equal(plain[k], got[k]) for k in got)  # the update did land


def test_verify_passes_for_faithful_exports_and_fails_for_a_perturbed_one(tmp_path):
    from rasa_megatron.adapter import export_peft_lora

    base = _base(tmp_path, "mixtral", torch.float32)
    tensors = _adapter(base, MOE)
    merged, peft = tmp_path / "merged", tmp_path / "peft"
    merged.mkdir()
    model = hf_model_with_adapter(str(base), MOE, tensors)
    write_merged(model, plan_merged(model, base, base), merged, progress=False)
    export_peft_lora(model, peft)
    strict = Tolerance(max_kl=1e-9, min_top1=1.0, atol=1e-5)  # fp32 throughout: only summation order differs
    for layers in (None, 1):
        report = verify_exports(hf_model_with_adapter(str(base), MOE, tensors), base, merged, peft, layers, strict)
        assert report["merged"]["passed"] and report["peft"]["passed"], report
        assert report["merged"]["max_abs_diff"] < 1e-5 and report["peft"]["top1_agreement"] == 1.0
    # the source is the adapted model, not the base: the base alone is far from the merged model
    off = dict(tensors)
    key = next(k for k in off if k.endswith("B_shared"))
    off[key] = off[key] * 3
    report = verify_exports(hf_model_with_adapter(str(base), MOE, off), base, merged, peft, None, strict)
    assert not report["merged"]["passed"] and not report["peft"]["passed"]
    assert report["merged"]["max_abs_diff"] > 10 * strict.atol


def test_verify_runs_the_source_without_adapter_dropout(tmp_path):
    """An adapter trained with dropout: the source model is evaluated in eval mode (no dropout), so a
    faithful PEFT export passes at fp32 tolerance."""
    from dataclasses import replace

    from rasa_megatron.adapter import export_peft_lora

    base = _base(tmp_path, "llama", torch.float32)
    config = replace(DENSE, dropout=0.5)
    tensors = _adapter(base, config)
    export_peft_lora(hf_model_with_adapter(str(base), config, tensors), tmp_path / "peft")
    report = verify_exports(hf_model_with_adapter(str(base), config, tensors), base, None, tmp_path / "peft", None,
                            Tolerance(max_kl=1e-9, min_top1=1.0, atol=1e-5))
    assert report["peft"]["passed"], report


def test_an_adapter_of_another_model_or_a_truncated_shard_is_named(tmp_path):
    base = _base(tmp_path, "llama", torch.float32)
    other = tmp_path / "wider"
    LlamaConfig(**{**LLAMA, "intermediate_size": 64}).save_pretrained(other)
    model = hf_model_with_adapter(str(other), DENSE, _adapter(other, DENSE))
    with pytest.raises(ValueError, match=r"down_proj.weight: base \(32, 48\) vs adapter \(32, 64\)"):
        plan_merged(model, base, other)
    files = sorted(base.glob("*.safetensors"))
    files[1].write_bytes(files[1].read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{files[1].name} .*truncated"):
        BaseWeights(base)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        BaseWeights(tmp_path / "wider")


MEMORY_PROBE = r"""
import json, resource, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig
from rasa_megatron import RaSAConfig
from rasa_megatron.adapter import hf_model_with_adapter
from rasa_megatron.convert.merged import plan_merged, write_merged
from rasa_megatron.inject import adapter_state_dict

base, out, layers, width = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
config = LlamaConfig(vocab_size=256, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=layers,
                     num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False)
if sys.argv[5] == "write":  # the synthetic base, one file per layer, never whole in memory
    base.mkdir()
    config.save_pretrained(base)
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    kv = width // 3
    weight_map = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        layer = {p + "self_attn.q_proj.weight": rand(width, width), p + "self_attn.k_proj.weight": rand(kv, width),
                 p + "self_attn.v_proj.weight": rand(kv, width), p + "self_attn.o_proj.weight": rand(width, width),
                 p + "mlp.gate_proj.weight": rand(3 * width, width), p + "mlp.up_proj.weight": rand(3 * width, width),
                 p + "mlp.down_proj.weight": rand(width, 3 * width), p + "input_layernorm.weight": rand(width),
                 p + "post_attention_layernorm.weight": rand(width)}
        save_file(layer, base / f"layer{i:03d}.safetensors")
        weight_map.update(dict.fromkeys(layer, f"layer{i:03d}.safetensors"))
    rest = {"model.embed_tokens.weight": rand(256, width), "model.norm.weight": rand(width), "lm_head.weight": rand(256, width)}
    save_file(rest, base / "rest.safetensors")
    weight_map.update(dict.fromkeys(rest, "rest.safetensors"))
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    sys.exit(0)
rasa = RaSAConfig(r=8, k=1, alpha=16, target_modules=("q_proj", "v_proj", "down_proj"))
from transformers import AutoModelForCausalLM
with torch.device("meta"):
    skeleton = __import__("rasa_megatron").apply_rasa(AutoModelForCausalLM.from_config(config), rasa)
tensors = {k: torch.full(p.shape, 0.01) for k, p in adapter_state_dict(skeleton).items()}
model = hf_model_with_adapter(config, rasa, tensors)
plan = plan_merged(model, base, base, max_shard_size=int(sys.argv[6]))
out.mkdir()
write_merged(model, plan, out, progress=False)
print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "shards": len(plan.shards),
                  "bound": plan.memory_bound(sum(t.numel() * 4 for t in tensors.values()))}))
"""


def test_merged_export_memory_does_not_grow_with_depth(tmp_path):
    """Peak RSS of the streamed merge of a 32-layer vs a 4-layer model of the same width (bf16, one
    output shard per layer): the difference stays under one layer's bytes (a loader of the whole model
    would hold 28 more layers, ~28x that)."""
    import subprocess
    import sys

    width = 1152  # 12 heads of 96; one bf16 layer is 31 MB, the per-layer adapter and module overhead ~0.3 MB
    layer_bytes = 2 * (2 * width * width + 2 * width * (width // 3) + 9 * width * width + 2 * width)
    script = tmp_path / "probe.py"
    script.write_text(MEMORY_PROBE)
    peaks = {}
    for layers in (4, 32):
        base, out = tmp_path / f"base{layers}", tmp_path / f"out{layers}"
        args = [sys.executable, str(script), str(base), str(out), str(layers), str(width)]
        subprocess.run([*args, "write", "0"], check=True)
        result = subprocess.run([*args, "merge", str(layer_bytes)], check=True, capture_output=True, text=True)
        peaks[layers] = json.loads(result.stdout.strip().splitlines()[-1])
        assert peaks[layers]["shards"] >= layers
    growth = peaks[32]["peak_rss"] - peaks[4]["peak_rss"]
    print(f"peak RSS growth 4 -> 32 layers: {growth / layer_bytes:.2f} layer")
    assert growth < layer_bytes, (growth / layer_bytes, peaks)


def test_sizes_parse_with_the_units_transformers_uses():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("500MB") == 5 * 10**8
    assert parse_size("1000") == 1000 and parse_size(7) == 7
    for bad in ("five", "-1MB", "0"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


HF_TO_MEGATRON_PROBE = r"""
import json, resource, sys
from rasa_megatron.megatron.dist_export import hf_to_dist_checkpoint

if __name__ == "__main__":
    hf_to_dist_checkpoint(sys.argv[1], sys.argv[2])
    print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def test_hf_to_megatron_memory_does_not_grow_with_depth(tmp_path):
    """Peak RSS of ``hf-to-megatron`` (the base streamed: a meta-device Megatron model, each tensor read,
    converted and written when torch DCP writes it) for a 32-layer vs a 4-layer model of the same
    width: the difference stays under one layer's bytes in the written dtype (fp32; building the model
    would hold 28 more layers, ~28x that). The 4-layer checkpoint loads back equal to the HF weights."""
    import subprocess
    import sys

    width = 1152
    layer_bytes = 4 * (2 * width * width + 2 * width * (width // 3) + 9 * width * width + 2 * width)
    probe, hf_probe = tmp_path / "probe.py", tmp_path / "hf_probe.py"
    probe.write_text(MEMORY_PROBE)
    hf_probe.write_text(HF_TO_MEGATRON_PROBE)
    peaks = {}
    for layers in (4, 32):
        base, out = tmp_path / f"base{layers}", tmp_path / f"dist{layers}"
        subprocess.run([sys.executable, str(probe), str(base), str(out), str(layers), str(width), "write", "0"],
                       check=True)
        result = subprocess.run([sys.executable, str(hf_probe), str(base), str(out)], check=True, capture_output=True,
                                text=True)
        peaks[layers] = json.loads(result.stdout.strip().splitlines()[-1])["peak_rss"]
    growth = peaks[32] - peaks[4]
    print(f"hf-to-megatron peak RSS growth 4 -> 32 layers: {growth / layer_bytes:.2f} layer")
    assert growth < layer_bytes, (growth / layer_bytes, peaks)
    from transformers import AutoConfig

    from rasa_megatron.cli.convert import main
    from rasa_megatron.convert.dist_checkpoint import DistBaseWeights
    from rasa_megatron.convert.merged import BaseWeights

    # --dry-run: the plan with its bound (three of the largest tensor, fc1 [2 x 3w, w] fp32), nothing written
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["hf-to-megatron", str(tmp_path / "base32"), str(tmp_path / "dry"), "--dry-run"]) == 0
    plan = printed.getvalue()
    assert "base: 195 tensors" in plan and f"{3 * 4 * 6 * width * width / 2 ** 30:.3f} GiB" in plan, plan
    assert not (tmp_path / "dry").exists()

    written, source = DistBaseWeights(tmp_path / "dist4", AutoConfig.from_pretrained(tmp_path / "base4")), BaseWeights(
        tmp_path / "base4")
    assert sorted(written.keys()) == sorted(source.keys())
    assert all(torch.equal(written.read(key), source.read(key).float()) for key in source.keys())
