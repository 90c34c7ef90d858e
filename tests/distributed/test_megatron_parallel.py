"""Megatron-core tensor-parallel RaSA on 2 CPU processes (gloo) against the single-process
Hugging Face RaSA layers with the same weights (fp64 both sides, tolerance 1e-10)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent


def run_worker(script: str, nproc: int, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}",
           str(HERE / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=HERE.parents[1])
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_tensor_parallel_rasa_layers_equal_hf_rasa(sequence_parallel):
    result = run_worker("megatron_tp_worker.py", 2, *(["--sequence-parallel"] if sequence_parallel else []))
    assert result["tp"] == 2 and result["sequence_parallel"] == sequence_parallel
    assert all(v <= 1e-10 for v in result["worst"].values()), result["worst"]
    # 2 layers x 7 modules x (A_private, B_private, diag) + 7 pools x (A_S, B_S)
    assert result["grads_checked"] == 2 * 7 * 3 + 7 * 2
    assert result["finalize_all_reduces"] == 1  # partial grads of replicated factors: one coalesced all-reduce
    if sequence_parallel:
        # one all-gather (column input) and one reduce-scatter (row output) forward, one reduce-scatter
        # (column dgrad) and one all-gather (row output grad) backward; Megatron alone also re-gathers
        # the column input in backward
        assert sorted(result["collectives_rasa"]) == [["dist_all_gather_func", 192]] * 2 + [["dist_reduce_scatter_func", 96]] * 2
    else:
        assert result["collectives_rasa"] == result["collectives_bare"] == [["all_reduce", 192]] * 2


GPT_LAYOUTS = {  # name: (processes, worker arguments)
    "tp2": (2, ["--tp", "2"]),
    "pp2": (2, ["--pp", "2"]),
    "tp2_sp": (2, ["--tp", "2", "--sp"]),
    "pp2_vpp2": (2, ["--pp", "2", "--vpp", "2"]),
    "tp2_pp2": (4, ["--tp", "2", "--pp", "2"]),
    # built from rasa_layer_spec (a new spec per virtual chunk, as Megatron-LM's model_provider does)
    "tp2_sp_spec": (2, ["--tp", "2", "--sp", "--spec"]),
    "pp2_vpp2_spec": (2, ["--pp", "2", "--vpp", "2", "--spec"]),
}


@pytest.mark.parametrize("layout", list(GPT_LAYOUTS))
def test_megatron_gpt_with_rasa_equals_hf_llama_with_rasa(layout):
    """A real Megatron GPTModel (4 layers, GQA, SwiGLU) with RaSA on the 7 HF linears, base weights
    from the converter, driven over gloo (tests/distributed/pp_driver.py), vs HF Llama + apply_rasa:
    init identical after the same seed; logits, loss, every adapter gradient and the adapter after 3
    AdamW steps within 1e-5 (fp32); pool collectives: 1 all-gather + 1 reduce-scatter over PP and 1
    all-reduce over TP per optimizer step (2 micro-batches). ``*_spec``: the model built from
    ``rasa_layer_spec(spec, config, seed)`` instead; the same checks, and only RaSA tensors trainable."""
    nproc, args = GPT_LAYOUTS[layout]
    result = run_worker("megatron_rasa_gpt_worker.py", nproc, *args)
    assert result["spec"] == ("--spec" in args)
    assert result["worst"]["init"] == 0.0
    assert result["adapter_round_trip"] == 0.0  # gather_hf_adapter(load_hf_adapter_(x)) == x
    assert all(v <= 1e-5 for v in result["worst"].values()), result["worst"]
    pp, tp = result["pp"], result["tp"]
    want = {"pp_all_gather": int(pp > 1), "pp_reduce_scatter": int(pp > 1), "tp_all_reduce": int(tp > 1)}
    assert result["collectives_per_step"] == [want] * 3


def test_dist_checkpoint_written_at_tp2_pp2_loads_on_other_layouts(tmp_path):
    """megatron.core.dist_checkpointing with RaSA: saved on TP2 x PP2 (4 processes), loaded into a
    model with a different fresh adapter on TP1xPP1, TP2xPP1 and TP1xPP2: every adapter tensor equals
    the reference's slice exactly and the logits equal the HF reference (1e-5)."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    run_worker("megatron_ckpt_worker.py", 4, "--tp", "2", "--pp", "2", "--save", str(ckpt))
    assert (ckpt / "metadata.json").is_file()
    _converts_offline(ckpt, tmp_path, verify=True)
    for tp, pp, spec in ((1, 1, False), (2, 1, False), (1, 2, True)):  # TP1xPP2: a rasa_layer_spec model loads it
        result = run_worker("megatron_ckpt_worker.py", tp * pp, "--tp", str(tp), "--pp", str(pp), "--load", str(ckpt),
                            *(["--spec"] if spec else []))
        assert result["spec"] == spec
        assert result["worst"]["adapter"] == 0.0, (tp, pp, result)
        assert result["worst"]["logits"] <= 1e-5, (tp, pp, result)


def test_dist_checkpoint_of_a_layer_spec_model_reshards_with_per_layer_keys(tmp_path):
    """A model built from rasa_layer_spec registers its pools on its first layer; Megatron's block
    gives that layer's entries per-layer keys (non-homogeneous layers), yet the pools are stored under
    one layout-free key: saved at TP2, loaded at PP2 by a post-build model and at TP1 x PP1 by a spec
    model, adapter exact and logits within 1e-5."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    run_worker("megatron_ckpt_worker.py", 2, "--tp", "2", "--save", str(ckpt), "--spec", "--non-homogeneous")
    _converts_offline(ckpt, tmp_path, verify=False)
    for tp, pp, spec in ((1, 2, False), (1, 1, True)):
        result = run_worker("megatron_ckpt_worker.py", tp * pp, "--tp", str(tp), "--pp", str(pp), "--load", str(ckpt),
                            "--non-homogeneous", *(["--spec"] if spec else []))
        assert result["worst"]["adapter"] == 0.0, (tp, pp, result)
        assert result["worst"]["logits"] <= 1e-5, (tp, pp, result)


def test_hf_to_megatron_writes_a_dist_checkpoint_that_loads_at_tp2_pp2(tmp_path, capsys):
    """``rasa-convert hf-to-megatron`` (one process, no torchrun) of the reference HF model + its project
    adapter: the torch_dist checkpoint loads at TP2 x PP2 into a model with another fresh adapter, every
    adapter tensor then equals the reference's slice exactly and the logits the HF model's within 1e-5;
    read back offline the adapter is the one given, bit for bit (HF -> Megatron -> HF). Bad input exits
    2 naming it and writes nothing."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from megatron_common import hf_reference

    from rasa_megatron import export_peft_lora, save_adapter
    from rasa_megatron.cli.convert import main
    from rasa_megatron.adapter import hf_model_with_adapter
    from rasa_megatron.convert.dist_checkpoint import adapter_from_dist_checkpoint
    from rasa_megatron.convert.merged import plan_merged, write_merged

    ref = hf_reference()
    base, adapter, ckpt = tmp_path / "base", tmp_path / "adapter", tmp_path / "dist"
    plain = LlamaForCausalLM(ref.config)
    plain.load_state_dict(ref.base_state)
    plain.save_pretrained(base)
    save_adapter(ref.model, adapter)
    export_peft_lora(ref.model, tmp_path / "peft")
    assert main(["hf-to-megatron", str(base), str(ckpt), "--tp", "2", "--pp", "2", "--adapter", str(adapter)]) == 0
    assert json.loads((ckpt / "checkpoint.json").read_text())["layout"]["tensor_model_parallel_size"] == 2
    result = run_worker("megatron_ckpt_worker.py", 4, "--tp", "2", "--pp", "2", "--load", str(ckpt))
    assert result["worst"]["adapter"] == 0.0 and result["worst"]["logits"] <= 1e-5, result
    tensors, config, _ = adapter_from_dist_checkpoint(ckpt)
    given = load_file(adapter / "rasa_adapter.safetensors")
    assert sorted(tensors) == sorted(given) and all(torch.equal(tensors[k], given[k]) for k in given)
    assert (config.r, config.k) == (ref.rasa.r, ref.rasa.k)
    # merged from the checkpoint's own base weights (read a layer at a time) == merged from the HF base
    assert main(["megatron-to-hf", str(ckpt), "--hf-config", str(base), "--merged", str(tmp_path / "m_dist")]) == 0
    model = hf_model_with_adapter(str(base), ref.rasa, given)
    (tmp_path / "m_hf").mkdir()
    write_merged(model, plan_merged(model, base, base), tmp_path / "m_hf", progress=False)
    from_dist, from_hf = load_file(tmp_path / "m_dist" / "model.safetensors"), load_file(tmp_path / "m_hf" / "model.safetensors")
    assert sorted(from_dist) == sorted(from_hf) and all(torch.equal(from_dist[k], from_hf[k]) for k in from_hf)
    # the base alone, vocabulary padded as Megatron-LM pads it, and back: bit-exact, padding truncated
    assert main(["hf-to-megatron", str(base), str(tmp_path / "dist_base"), "--tp", "2",
                 "--make-vocab-size-divisible-by", "128"]) == 0
    from torch.distributed.checkpoint import FileSystemReader
    rows = FileSystemReader(str(tmp_path / "dist_base")).read_metadata().state_dict_metadata[
        "embedding.word_embeddings.weight"].size[0]
    assert rows == 256 > ref.config.vocab_size
    assert main(["megatron-to-hf", str(tmp_path / "dist_base"), "--hf-config", str(base), "--merged",
                 str(tmp_path / "round_trip"), "--verify", "--base", str(base), "--verify-atol", "0"]) == 0
    original, back = load_file(base / "model.safetensors"), load_file(tmp_path / "round_trip" / "model.safetensors")
    assert sorted(original) == sorted(back) and all(torch.equal(original[k], back[k]) for k in original)
    # the PEFT export of the same adapter: placed with its r and k, read back as the tensors it imports to
    from rasa_megatron.convert.peft_import import rasa_from_peft_lora

    assert main(["hf-to-megatron", str(base), str(tmp_path / "dist_peft"), "--adapter", str(tmp_path / "peft")]) == 0
    imported, imported_config = rasa_from_peft_lora(tmp_path / "peft")
    tensors, config, _ = adapter_from_dist_checkpoint(tmp_path / "dist_peft")
    assert (config.r, config.k) == (imported_config.r, imported_config.k) == (ref.rasa.r, ref.rasa.k)
    assert sorted(tensors) == sorted(imported) and all(torch.equal(tensors[k], imported[k]) for k in imported)
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, message in (([str(base), str(ckpt)], "exists; pass --overwrite"),
                          ([str(base), str(tmp_path / "x"), "--tp", "3"], "not divisible by tensor-parallel size = 3"),
                          ([str(base), str(tmp_path / "x"), "--adapter", str(tmp_path)], "rasa_config.json not found"),
                          ([str(base), str(tmp_path / "x"), "--ep", "2"], "needs a MoE model")):
        capsys.readouterr()
        assert main(["hf-to-megatron", *args]) == 2, args
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def _converts_offline(ckpt, tmp_path, verify: bool):
    """``rasa-convert megatron-to-hf`` of the torch_dist checkpoint in this process (no torch.distributed):
    the HF adapter equals the reference's exactly; with ``verify`` the merged model and the PEFT adapter
    give the reference RaSA model's logits within 1e-5 (fp32); a truncated or missing .distcp file exits
    2 naming it and writes nothing."""
    import shutil

    import torch
    from transformers import LlamaForCausalLM

    from megatron_common import hf_reference
    from safetensors.torch import load_file

    from rasa_megatron import adapter_state_dict
    from rasa_megatron.cli.convert import main
    from rasa_megatron.convert.hf_export import export_engine_checkpoint
    from rasa_megatron.convert.verify import Tolerance

    ref = hf_reference()
    base = tmp_path / "base"
    plain = LlamaForCausalLM(ref.config)
    plain.load_state_dict(ref.base_state)
    plain.save_pretrained(base)
    out = tmp_path / "hf"
    outputs = {"adapter": out / "adapter", **({"merged": out / "merged", "peft": out / "peft"} if verify else {})}
    report = export_engine_checkpoint(ckpt, base, base=base, verify=verify, progress=False,
                                      tolerance=Tolerance(max_kl=1e-8, min_top1=1.0, atol=1e-5), **outputs)
    converted = load_file(outputs["adapter"] / "rasa_adapter.safetensors")
    want = {k: v.detach() for k, v in adapter_state_dict(ref.model).items()}
    assert sorted(converted) == sorted(want) and all(torch.equal(converted[k], want[k]) for k in want)
    if verify:
        assert all(report["verify"][n]["passed"] for n in ("merged", "peft")), report["verify"]
    damaged = tmp_path / "damaged"
    shutil.copytree(ckpt, damaged)
    data_file = sorted(damaged.glob("*.distcp"))[-1]
    data_file.write_bytes(data_file.read_bytes()[:-200])
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["megatron-to-hf", str(damaged), "--hf-config", str(base), "--adapter", str(tmp_path / "again")]
    assert main(args) == 2
    data_file.unlink()
    assert main(args) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("inject", ["post_build", "spec"])
def test_megatron_moe_expert_parallel_rasa_equals_hf_mixtral_rasa(inject):
    """Megatron MoE (SequentialMLP, all-gather dispatcher, EP=2) with RaSA on attention and on every
    expert's fc1/fc2 vs HF Mixtral with RaSA on gate_up_proj/down_proj: the same pool grouping (one
    pool per expert index across layers), so the init after the same seed is identical; logits, loss
    and all adapter gradients within 1e-5; each rank holds only its 2 experts' adapters. RaSA put in
    after building or through rasa_layer_spec. The adapter gather sends the dense pieces from
    data-parallel rank 0 only (rank 1 is a data-parallel replica) and the experts from both."""
    result = run_worker("megatron_moe_worker.py", 2, *(["--spec"] if inject == "spec" else []))
    assert result["worst"]["init"] == 0.0
    assert all(v <= 1e-5 for v in result["worst"].values()), result["worst"]
    assert result["expert_units"] == 2 * 2 * 2  # layers x local experts x (fc1, fc2)
    assert result["adapter_round_trip"] == 0.0
    # the gather takes the dense adapter from data-parallel rank 0 only, each expert from its one owner
    (dense_0, experts_0), (dense_1, experts_1) = result["pieces_sent"]
    assert dense_0 > 0 and dense_1 == 0 and experts_0 == experts_1 > 0


def test_tensor_parallel_gpt_model_gives_hf_llama_logits():
    """A GPTModel (base weights from the converter, no adapter) at TP=2 gives HF Llama's logits
    (1e-5): untied and tied embeddings, each without and with sequence parallelism, in one launch."""
    result = run_worker("megatron_gpt_worker.py", 2)
    assert result["tp"] == 2
    assert result["local_vocab"] == 96 // 2  # each rank held half the vocabulary
    assert set(result["worst"]) == {"untied", "tied", "untied_sp", "tied_sp"}
    assert all(v <= 1e-5 for v in result["worst"].values()), result["worst"]


def test_adapter_dropout_masks_are_independent_per_module_tp_shard_and_stage():
    """Adapter dropout (p = 0.5) at TP2 x PP2 after the engine's seeding, one training-mode forward:
    q/k/v and gate/up of a layer draw their own masks (as a HF model's separate linears do: ~half of the
    elements disagree); a column adapter drops the same elements of its total input on both TP ranks
    (disagreement 0); a row adapter's input shards get independent masks per TP rank (Megatron's
    model-parallel-rng tracker state) and the two pipeline stages independent ones (seed + 100 x stage):
    ~half disagree. Bounds: 0.5 +- 0.13, five binomial standard deviations for the smallest mask
    (384 elements); every drop fraction within 0.5 +- 0.1."""
    result = run_worker("megatron_dropout_worker.py", 4)
    assert result["p"] == 0.5 and len(result["drop_fraction"]) == 2 * 2 * 2 * 7  # TP x PP x 2 layers x 7
    assert all(abs(f - 0.5) <= 0.1 for f in result["drop_fraction"]), result["drop_fraction"]
    assert result["column_across_tp"] and all(d == 0.0 for d in result["column_across_tp"])
    for kind in ("qkv", "gate_up", "row_across_tp", "across_pp"):
        assert result[kind] and all(abs(d - 0.5) <= 0.13 for d in result[kind]), (kind, result[kind])


@pytest.mark.parametrize("layout", [["--tp", "2"], ["--pp", "2"]], ids=["tp2", "pp2"])
def test_a_loop_that_skips_rasas_gradient_reductions_is_refused(layout):
    """Megatron-LM's train() installs Megatron's own finalize_model_grads, which knows nothing of RaSA's
    once-per-step reductions (TP-partial gradients of replicated factors, pipeline pools): at TP2 and
    PP2 a training forward under it raises, naming finalize_model_grads_with_rasa, instead of letting
    the TP copies drift apart or the pools go unreduced; under ours it runs. A gathered pool whose
    slices changed after the gather (a step without RaSA's finalisation) is refused as stale."""
    ranks = run_worker("megatron_guard_worker.py", 2, *layout)
    for rank in ranks:
        assert "needs its gradient reductions" in rank["megatron_own"]
        assert "finalize_model_grads_with_rasa" in rank["megatron_own"]
        assert rank["ours"] == "ran"
        if layout[0] == "--pp":
            assert "gathered pipeline pool is stale" in rank["stale"]
