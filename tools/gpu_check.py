"""The GPU paths in one run (``bash tools/gpu_check.sh``): a single-GPU machine, NCCL, world size 1, bf16,
through ``examples/pretrain_rasa.py``, each run against the fp32 CPU run of the same recipe recorded by
this script; writes ``gpu_check.json`` (per case: losses, gradient norms, their worst relative distance
to the CPU reference, peak GPU memory, wall time, pass/fail) to ``--out``.

Cases (tiny Llama / tiny Mixtral with RaSA r=4 k=1, 3 optimizer steps of 8 samples):
  deepspeed ZeRO-3 with DeepSpeed's fused Lion and with FusedAdam; ZeRO-3 with optimizer offload
  (DeepSpeedCPUAdam, JIT-built); tiny Mixtral under ZeRO-3; a ``--stop-after 2`` + ``--resume --portable``
  run against the uninterrupted one; the Megatron engine with activation recompute (SDPA attention,
  RNG tracker, SP off) and with Megatron's own DotProductAttention on the tiny Mixtral (its tracker fork
  with SP off). Plus: ``apply_rasa`` on a CUDA model draws the CPU model's adapter.

Every run is one process (world size 1, no torchrun, 127.0.0.1), killed with its process group after
``--case-timeout``; the fp32 CPU references run in parallel while DeepSpeed's ops build in the background;
cases left when ``--budget`` is spent are reported as skipped; ``gpu_check.json`` is rewritten after
every case, so a run cut short still reports what it finished. Logs: ``gpu_check.log`` (GPU runs),
``ref_*.log`` (CPU references), ``deepspeed_ops_build.log``.

``--cpu`` runs every case on the CPU instead (fp32 against fp32): a check of this script itself.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "pretrain_rasa.py"
CONFIGS = ROOT / "examples" / "configs"
TINY_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=64,
                  intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-5)
TINY_MIXTRAL = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=512, hidden_size=64,
                    intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                    tie_word_embeddings=False, rms_norm_eps=1e-5)
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
#: bf16 on the GPU against fp32 on the CPU: the losses of a tiny model at ~ln(vocab) agree to ~1e-3 and
#: the gradient norms to ~1e-2 (the CPU tests measure 5e-6 and 2e-3 for bf16 vs fp32 on the CPU)
LOSS_RTOL, NORM_RTOL = 2e-2, 5e-2


def workspace(root: Path) -> dict:
    """A word-level tokenizer trained on the data (no hub), the SFT data, the tiny checkpoints."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from rasa_megatron.tasks.arithmetic import generate_problems

    root.mkdir(parents=True, exist_ok=True)
    problems = generate_problems(48, seed=5)
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps({"instruction": p["question"], "output": p["solution"]}) + "\n"
                            for p in problems))
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [p["question"] + " " + p["solution"] for p in problems] + ["Below is an instruction that describes a "
                                                                      "task. Write a response that appropriately "
                                                                      "completes the request. ### Instruction: "
                                                                      "### Response:"]
    tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(vocab_size=500, special_tokens=["<unk>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>", pad_token="</s>")
    fast.save_pretrained(root / "tokenizer")
    paths = {"data": str(data), "tokenizer": str(root / "tokenizer")}
    for name, config in (("llama", TINY_LLAMA), ("mixtral", TINY_MIXTRAL)):
        (root / f"{name}.json").write_text(json.dumps(config))
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(root / f"{name}.json"))
        model.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def recipe(paths: dict, out: Path, model: str, precision: str, optimizer: str, deepspeed: str | None = None,
           megatron: dict | None = None) -> Path:
    data = {"model": {"path": paths[model], "tokenizer": paths["tokenizer"]},
            "data": {"mode": "sft", "paths": [paths["data"]], "seq_len": 96},
            "adapter": {"method": "rasa", "r": 4, "k": 1, "alpha": 8, "dropout": 0.0,
                        **({"target_modules": ["q_proj", "v_proj"], "target_parameters": EXPERTS}
                           if model == "mixtral" else {})},
            "train": {"global_batch_size": 8, "micro_batch_size": 2, "max_steps": 3, "lr": 2e-3,
                      "precision": precision, "optimizer": optimizer, "gradient_checkpointing": True, "seed": 3,
                      "warmup_ratio": 0.25},
            "output": {"dir": str(out)}}
    if megatron is not None:
        data["engine"], data["megatron"] = "megatron", megatron
    else:
        data["deepspeed"] = str(CONFIGS / deepspeed)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(recipe_path: Path, gpu: bool, *extra: str, log: Path, timeout: float) -> tuple[float, int]:
    """One single-process run (world size 1, without torchrun: no hostname lookup on an offline machine);
    returns (seconds, exit status). On ``timeout`` the run's whole process group is killed (a JIT build
    left half done would hold torch's build lock for the next case)."""
    env = {**os.environ, "OMP_NUM_THREADS": "4", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, str(SCRIPT), "--config", str(recipe_path), *extra]
    started = time.perf_counter()
    with open(log, "a") as handle:
        handle.write(f"\n=== {' '.join(command)}\n")
        handle.flush()
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        try:
            status = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"timed out after {timeout:.0f} s: {' '.join(command)}; see {log}") from None
    return time.perf_counter() - started, status


def prebuild_deepspeed_ops(log: Path) -> subprocess.Popen:
    """JIT-build DeepSpeed's fused Adam / Lion and CPU Adam in the background (minutes on a fresh
    machine) while the CPU references run; a case that needs an op waits on torch's build lock."""
    code = ("from deepspeed.accelerator import get_accelerator\n"
            "for name in ('FusedAdamBuilder', 'FusedLionBuilder', 'CPUAdamBuilder'):\n"
            "    get_accelerator().create_op_builder(name).load()\n    print('built', name, flush=True)\n")
    handle = open(log, "a")
    return subprocess.Popen([sys.executable, "-c", code], stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
                            start_new_session=True)


def metrics(out: Path) -> dict:
    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {key: [float(r[key]) for r in rows] for key in ("loss", "grad_norm", "peak_mem_mib")}


def worst_rel(got: list, want: list) -> float:
    """The largest relative distance; inf for a length mismatch or any non-finite value (a NaN would
    otherwise vanish in max)."""
    if len(got) != len(want) or not all(math.isfinite(v) for v in [*got, *want]):
        return float("inf")
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got, want))


CASES = {  # name: (model, optimizer, deepspeed config or None, megatron section or None)
    "zero3_fused_lion": ("llama", "lion", "ds_zero3.json", None),
    "zero3_fused_adam": ("llama", "adamw", "ds_zero3.json", None),
    "zero3_offload_cpu_adam": ("llama", "adamw", "ds_zero3_offload_optimizer.json", None),
    "zero3_mixtral_fused_lion": ("mixtral", "lion", "ds_zero3.json", None),
    "megatron_recompute_sdpa": ("llama", "adamw", None, {"attention": "sdpa"}),
    "megatron_mixtral_local_attention_sp_off": ("mixtral", "adamw", None, {"attention": "local"}),
}


def megatron_torch_dist_case(paths: dict, work: Path, gpu: bool, log: Path, timeout,
                             distributed_optimizer: bool = False) -> dict:
    """``rasa-convert hf-to-megatron`` on this machine (with CUDA: Megatron's real RNG tracker, no CPU
    stand-ins), then the Megatron engine initialised from that checkpoint (``megatron.pretrained_checkpoint``)
    with ``output.save_format: torch_dist``, stopped after step 2 and resumed: its losses against the
    ``megatron_recompute_sdpa`` run of the same recipe from the HF directory (same precision).
    ``distributed_optimizer``: with Megatron's distributed optimizer (its fully reshardable state)."""
    suffix = "_distopt" if distributed_optimizer else ""
    dist_dir = work / f"llama_torch_dist{suffix}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           **({} if gpu else {"CUDA_VISIBLE_DEVICES": ""})}
    convert = subprocess.run([sys.executable, "-c", "import sys; from rasa_megatron.cli.convert import main; "
                              "sys.exit(main(sys.argv[1:]))", "hf-to-megatron", paths["llama"], str(dist_dir)],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=max(1.0, timeout()))
    with open(log, "a") as handle:
        handle.write(f"\n=== hf-to-megatron\n{convert.stdout}{convert.stderr}")
    if convert.returncode != 0:
        raise RuntimeError(f"hf-to-megatron failed ({convert.returncode}): {convert.stderr[-500:]}")
    part = work / f"megatron_torch_dist{suffix}"
    path = recipe(paths, part, "llama", "bf16" if gpu else "fp32", "adamw", None,
                  {"attention": "sdpa", "pretrained_checkpoint": str(dist_dir),
                   "use_distributed_optimizer": distributed_optimizer})
    data = yaml.safe_load(path.read_text())
    data["output"]["save_format"] = "torch_dist"
    path.write_text(yaml.safe_dump(data))
    statuses = [launch(path, gpu, "--stop-after", "2", log=log, timeout=timeout())[1]]
    statuses.append(launch(path, gpu, "--resume", log=log, timeout=timeout())[1])
    got, full = metrics(part), metrics(work / "megatron_recompute_sdpa")
    rel = worst_rel(got["loss"], full["loss"])
    torch_dist = (part / "checkpoints" / "step0000002" / "metadata.json").is_file()
    return {"exit_statuses": statuses, "losses": got["loss"], "from_hf_losses": full["loss"], "loss_rel": rel,
            "torch_dist": torch_dist, "passed": statuses == [0, 0] and rel <= 1e-3 and torch_dist}


def adapter_init_on_cuda() -> dict:
    """apply_rasa on a CUDA model (bf16 base) draws the CPU model's adapter exactly (issue 13, item 10)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rasa_megatron import RaSAConfig, adapter_state_dict, apply_rasa

    config = AutoConfig.for_model(**{k: v for k, v in TINY_LLAMA.items() if k != "architectures"})
    adapters = []
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype)
        torch.manual_seed(11)
        apply_rasa(model, RaSAConfig(r=4, k=1, alpha=8))
        adapters.append({k: v.detach().float().cpu() for k, v in adapter_state_dict(model).items()})
    worst = max((adapters[0][k] - adapters[1][k]).abs().max().item() for k in adapters[0])
    return {"max_abs_diff": worst, "passed": worst == 0.0}


def environment(gpu: bool) -> dict:
    """What the machine has: versions of what the check depends on, and Python.h (the op builds need it)."""
    import importlib.metadata as md

    import torch

    versions = {}
    for name in ("torch", "transformers", "peft", "deepspeed", "megatron-core", "datasets", "pydantic",
                 "typing_extensions", "packaging", "safetensors", "tokenizers", "ninja"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return {"device": torch.cuda.get_device_name() if gpu else "cpu", "python": sys.version.split()[0],
            "python_h": os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")),
            "cuda_home": os.environ.get("CUDA_HOME") or shutil.which("nvcc"), "versions": versions}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_check"))
    parser.add_argument("--work", default="/tmp/rasa_gpu_check")
    parser.add_argument("--budget", type=float, default=480.0,
                        help="seconds for all cases; the cases left when it is spent are reported as skipped")
    parser.add_argument("--case-timeout", type=float, default=240.0, help="seconds for one run")
    parser.add_argument("--cpu", action="store_true", help="run the 'GPU' cases on the CPU (checks this script)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        print("error: no CUDA device (use --cpu to check the script itself)", file=sys.stderr)
        return 2
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)  # a rerun on a warm machine must not resume the last run's output
    log = out / "gpu_check.log"
    started = time.perf_counter()
    deadline = started + args.budget
    summary = {**environment(gpu), "tolerances": {"loss_rtol": LOSS_RTOL, "grad_norm_rtol": NORM_RTOL},
               "cases": {}}

    def save() -> None:  # after every case: a run cut short still reports what it finished
        summary["seconds"] = round(time.perf_counter() - started, 1)
        summary["passed"] = bool(summary["cases"]) and all(c.get("passed") for c in summary["cases"].values())
        tmp = out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, out / "gpu_check.json")

    def record(name: str, case: dict) -> None:
        summary["cases"][name] = case
        print(f"{name}: {json.dumps(case)}", flush=True)
        save()

    def timeout() -> float:
        return min(args.case_timeout, deadline - time.perf_counter())

    save()
    paths = workspace(work / "workspace")
    builder = prebuild_deepspeed_ops(out / "deepspeed_ops_build.log") if gpu else None
    # the fp32 CPU references, all at once (the GPU machine has 16 cores), while the ops build
    ref_dirs = {}
    for model, optimizer, ds, mg in CASES.values():
        key = (model, optimizer, mg is None)
        if key not in ref_dirs:
            ref_dirs[key] = work / f"ref_{model}_{optimizer}_{'ds' if mg is None else 'mg'}"
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(ref_dirs) if gpu else 1)
    references = {key: pool.submit(launch, recipe(paths, ref_out, key[0], "fp32", key[1],
                                                  "ds_zero3.json" if key[2] else None,
                                                  None if key[2] else {"attention": "sdpa"}),
                                   False, log=out / f"{ref_out.name}.log", timeout=args.case_timeout)
                  for key, ref_out in ref_dirs.items()}
    for name, (model, optimizer, ds, mg) in CASES.items():
        if not gpu and mg is not None and mg.get("attention") == "local":
            record(name, {"passed": True, "skipped": "Megatron's DotProductAttention needs CUDA"})
            continue
        if timeout() < 30:
            record(name, {"passed": False, "skipped": f"the time budget ({args.budget:.0f} s) is spent"})
            continue
        try:
            run_out = work / name
            seconds, status = launch(recipe(paths, run_out, model, "bf16" if gpu else "fp32", optimizer, ds, mg), gpu,
                                     log=log, timeout=timeout())
            key = (model, optimizer, mg is None)
            _, ref_status = references[key].result(timeout=max(1.0, deadline - time.perf_counter()))
            if ref_status != 0:
                raise RuntimeError(f"the CPU reference run failed ({ref_status}); see {out / ref_dirs[key].name}.log")
            if not (run_out / "metrics.csv").is_file():
                raise RuntimeError(f"the run failed ({status}) before its first step; see {log}")
            got, want = metrics(run_out), metrics(ref_dirs[key])
            case = {"seconds": round(seconds, 1), "exit_status": status, "losses": got["loss"],
                    "reference_losses": want["loss"], "loss_rel": worst_rel(got["loss"], want["loss"]),
                    "grad_norm_rel": worst_rel(got["grad_norm"], want["grad_norm"]),
                    "peak_gpu_mem_mib": max(got["peak_mem_mib"]) if gpu else None}
            case["passed"] = status == 0 and case["loss_rel"] <= LOSS_RTOL and case["grad_norm_rel"] <= NORM_RTOL
        except Exception as err:  # noqa: BLE001 - a failed case is reported, the others still run
            case = {"passed": False, "error": str(err)}
        record(name, case)
    # --portable resume: stop after 2 of 3 steps, resume from the world-size-independent state
    try:
        if timeout() < 60:
            raise RuntimeError(f"skipped: the time budget ({args.budget:.0f} s) is spent")
        part = work / "portable"
        path = recipe(paths, part, "llama", "bf16" if gpu else "fp32", "adamw", "ds_zero3.json")
        statuses = [launch(path, gpu, "--stop-after", "2", log=log, timeout=timeout())[1]]
        statuses.append(launch(path, gpu, "--resume", "--portable", log=log, timeout=timeout())[1])
        got, full = metrics(part), metrics(work / "zero3_fused_adam")
        record("zero3_portable_resume", {"exit_statuses": statuses, "losses": got["loss"],
                                         "uninterrupted_losses": full["loss"],
                                         "loss_rel": worst_rel(got["loss"], full["loss"]),
                                         "passed": statuses == [0, 0] and worst_rel(got["loss"], full["loss"]) <= 1e-3})
    except Exception as err:  # noqa: BLE001
        record("zero3_portable_resume", {"passed": False, "error": str(err)})
    try:
        if timeout() < 60:
            raise RuntimeError(f"skipped: the time budget ({args.budget:.0f} s) is spent")
        record("megatron_torch_dist_from_hf_to_megatron", megatron_torch_dist_case(paths, work, gpu, log, timeout))
    except Exception as err:  # noqa: BLE001
        record("megatron_torch_dist_from_hf_to_megatron", {"passed": False, "error": str(err)})
    try:
        if timeout() < 60:
            raise RuntimeError(f"skipped: the time budget ({args.budget:.0f} s) is spent")
        record("megatron_torch_dist_distributed_optimizer",
               megatron_torch_dist_case(paths, work, gpu, log, timeout, distributed_optimizer=True))
    except Exception as err:  # noqa: BLE001
        record("megatron_torch_dist_distributed_optimizer", {"passed": False, "error": str(err)})
    if gpu:
        try:
            record("adapter_init_on_cuda", adapter_init_on_cuda())
        except Exception as err:  # noqa: BLE001
            record("adapter_init_on_cuda", {"passed": False, "error": str(err)})
    pool.shutdown(wait=False, cancel_futures=True)
    if builder is not None and builder.poll() is None:
        os.killpg(builder.pid, signal.SIGKILL)
    save()
    print(json.dumps({name: case.get("passed") for name, case in summary["cases"].items()}))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
