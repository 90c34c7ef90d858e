"""``rasa-eval`` on every model form the issue names: an HF dir, base + RaSA adapter, base + PEFT
export, a merged export (and an in-memory merge); fp32 and bf16. The forms must give the same
per-sample log-likelihoods (1e-4, fp32: see test_lm_harness.py); bad input exits non-zero with a
message and writes nothing."""
import copy
import json

import pytest

from rasa_megatron import RaSAConfig, apply_rasa, export_peft_lora, merge_and_unload, save_adapter
from rasa_megatron.cli.evaluate import main
from rasa_megatron.eval.fixtures import write_lm_fixtures
from rasa_megatron.eval.models import adapter_kind, load_for_eval


@pytest.fixture(scope="module")
def saved_forms(tmp_path_factory, smollm2_tokenizer, tiny_llama):
    """base/ (HF dir + tokenizer), rasa/ (project adapter), peft/ (its PEFT export), merged/, data/."""
    import torch

    from rasa_megatron import adapter_state_dict

    root = tmp_path_factory.mktemp("forms")
    base = tiny_llama(smollm2_tokenizer, seed=1)
    base.save_pretrained(root / "base")
    smollm2_tokenizer.save_pretrained(root / "base")
    model = apply_rasa(copy.deepcopy(base), RaSAConfig(r=4, k=1, alpha=8))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, param in sorted(adapter_state_dict(model).items()):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    save_adapter(model, root / "rasa")
    export_peft_lora(model, root / "peft")
    merged = merge_and_unload(copy.deepcopy(model))
    merged.save_pretrained(root / "merged")
    smollm2_tokenizer.save_pretrained(root / "merged")
    write_lm_fixtures(root / "data", n=4, seed=1)
    return root


def _run(args, capsys):
    code = main(args)
    return code, capsys.readouterr()


def _sample_logliks(out_dir):
    found = {}
    for task in ("hellaswag", "winogrande", "arc_challenge"):
        for line in (out_dir / f"samples_{task}.jsonl").read_text().splitlines():
            record = json.loads(line)
            for i, ll in enumerate(record["loglikelihoods"]):
                found[(task, record["doc_id"], i)] = ll
    return found


def test_every_model_form_gives_the_same_loglikelihoods(saved_forms, tmp_path, capsys):
    forms = {"rasa": ["--adapter", str(saved_forms / "rasa")],
             "rasa_merged_in_memory": ["--adapter", str(saved_forms / "rasa"), "--merge"],
             "peft": ["--adapter", str(saved_forms / "peft")],
             "merged_export": None}
    results = {}
    for name, extra in forms.items():
        model = saved_forms / ("merged" if extra is None else "base")
        out = tmp_path / name
        code, captured = _run(["lm", "--model", str(model), *(extra or []), "--data-dir", str(saved_forms / "data"),
                               "--out", str(out), "--fixture", "--no-progress", "--batch-size", "3"], capsys)
        assert code == 0, captured.err
        report = json.loads((out / "results.json").read_text())
        assert report["meta"]["adapter_kind"] == ({"rasa": "rasa", "rasa_merged_in_memory": "rasa", "peft": "peft"}
                                                  .get(name))
        assert all(s["n"] == 4 and len(s["data_sha256"]) == 64 and s["fixture"] for s in report["scores"])
        assert "FIXTURE" in (out / "results.md").read_text() and "FIXTURE" in captured.out
        results[name] = _sample_logliks(out)
    reference = results.pop("rasa")
    for name, found in results.items():
        assert found.keys() == reference.keys()
        for key in reference:
            assert found[key] == pytest.approx(reference[key], abs=1e-4), (name, key)


def test_bf16_plain_hf_dir_runs(saved_forms, tmp_path, capsys):
    code, captured = _run(["lm", "--model", str(saved_forms / "base"), "--dtype", "bf16", "--tasks", "winogrande",
                           "--data-dir", str(saved_forms / "data"), "--out", str(tmp_path / "o"), "--no-progress"],
                          capsys)
    assert code == 0, captured.err
    report = json.loads((tmp_path / "o" / "results.json").read_text())
    assert report["meta"]["dtype"] == "bfloat16" and report["scores"][0]["benchmark"] == "winogrande"


def test_bad_input_exits_nonzero_and_writes_nothing(saved_forms, tmp_path, capsys, monkeypatch):
    out = tmp_path / "never"
    cases = [
        (["lm", "--model", str(tmp_path), "--data-dir", str(saved_forms / "data")], 2, "no config.json"),
        (["lm", "--model", str(saved_forms / "base"), "--adapter", str(saved_forms / "data"),
          "--data-dir", str(saved_forms / "data")], 2, "not an adapter directory"),
        (["lm", "--model", str(saved_forms / "base"), "--tasks", "mmlu", "--data-dir", str(saved_forms / "data")], 2,
         "unknown lm-eval task"),
        (["lm", "--model", str(saved_forms / "base"), "--data-dir", str(tmp_path)], 2, "not found"),
        (["lm", "--model", str(saved_forms / "base"), "--batch-size", "0", "--data-dir", str(saved_forms / "data")], 2,
         "--batch-size must be positive"),
        (["lm", "--model", str(saved_forms / "base"), "--device", "cuda", "--data-dir", str(saved_forms / "data")], 2,
         "cuda"),
    ]
    monkeypatch.delenv("RASA_ALLOW_CODE_EVAL", raising=False)
    cases.append((["code", "--model", str(saved_forms / "base")], 3, "RASA_ALLOW_CODE_EVAL=1"))
    for args, expected_code, message in cases:
        code, captured = _run(args + ["--out", str(out), "--no-progress"], capsys)
        assert code == expected_code and message in captured.err, (args, captured.err)
        assert not out.exists()


def test_load_for_eval_forms(saved_forms):
    assert adapter_kind(saved_forms / "rasa") == "rasa" and adapter_kind(saved_forms / "peft") == "peft"
    model, tokenizer, description = load_for_eval(saved_forms / "base", saved_forms / "peft", merge=True)
    assert description["merged"] and not model.training and tokenizer.pad_token is not None
    with pytest.raises(ValueError, match="dtype 'fp16'; valid"):
        load_for_eval(saved_forms / "base", dtype="fp16")


def test_math_command_on_the_arithmetic_set(saved_forms, tmp_path, capsys):
    from rasa_megatron.tasks.arithmetic import generate_problems

    data = tmp_path / "arith.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in generate_problems(3, seed=4)))
    out = tmp_path / "math"
    code, captured = _run(["math", "--model", str(saved_forms / "base"), "--adapter", str(saved_forms / "rasa"),
                           "--data", str(data), "--max-new-tokens", "6", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, captured.err
    scores = json.loads((out / "results.json").read_text())["scores"]
    assert {(s["benchmark"], s["metric"]) for s in scores} == {("math", "math_verify"), ("math", "minerva")}
    assert all(s["n"] == 3 and len(s["data_sha256"]) == 64 for s in scores)
    assert len((out / "samples_math.jsonl").read_text().splitlines()) == 3


def test_code_command_with_the_opt_in(saved_forms, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RASA_ALLOW_CODE_EVAL", "1")
    out = tmp_path / "code"
    code, captured = _run(["code", "--model", str(saved_forms / "merged"), "--limit", "2", "--num-samples", "2",
                           "--temperature", "0.8", "--ks", "1", "2", "--max-new-tokens", "8", "--timeout", "5",
                           "--memory-mb", "2048", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, captured.err
    report = json.loads((out / "results.json").read_text())
    scores = report["scores"]
    assert report["meta"]["argv"]["memory_mb"] == 2048 and report["meta"]["argv"]["timeout"] == 5
    assert [(s["benchmark"], s["metric"], s["n"]) for s in scores] == [("humaneval", "pass@1", 2),
                                                                       ("humaneval", "pass@2", 2)]
    assert len((out / "samples_code.jsonl").read_text().splitlines()) == 4
    code, captured = _run(["code", "--model", str(saved_forms / "merged"), "--num-samples", "2", "--ks", "5",
                           "--out", str(tmp_path / "never"), "--no-progress"], capsys)
    assert code == 2 and "1 <= k <= num_samples=2" in captured.err and not (tmp_path / "never").exists()
    code, captured = _run(["code", "--model", str(saved_forms / "merged"), "--timeout", "0",
                           "--out", str(tmp_path / "never"), "--no-progress"], capsys)
    assert code == 2 and "--timeout must be positive" in captured.err and not (tmp_path / "never").exists()


def test_bad_data_and_output_fail_before_the_model_loads(saved_forms, tmp_path, capsys, monkeypatch):
    import gzip

    from rasa_megatron.eval import models

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(models, "load_for_eval", never)
    monkeypatch.setenv("RASA_ALLOW_CODE_EVAL", "1")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "corrupt.jsonl.gz").write_bytes(b"not gzip at all")
    bad_wino = tmp_path / "wino"
    write_lm_fixtures(bad_wino, n=2)
    (bad_wino / "winogrande.jsonl").write_text(json.dumps({"sentence": "no blank", "option1": "a", "option2": "b",
                                                           "answer": "1"}) + "\n")
    with gzip.open(tmp_path / "bad_code.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"task_id": "T/0", "prompt": "def f():\n"}) + "\n")
    base = str(saved_forms / "base")
    cases = [
        (["lm", "--model", base, "--data-dir", str(saved_forms / "data"), "--out", str(tmp_path / "a_file")],
         "exists and is not a directory"),
        (["lm", "--model", base, "--data-dir", str(bad_wino), "--tasks", "winogrande"], "winogrande.jsonl:1"),
        (["lm", "--model", base, "--data-dir", str(saved_forms / "data"), "--num-fewshot", "5"],
         "_train.jsonl"),
        (["math", "--model", base, "--data", str(tmp_path)], "Is a directory"),
        (["math", "--model", base, "--data", str(tmp_path / "empty.jsonl")], "no problems"),
        (["math", "--model", base, "--data", str(tmp_path / "corrupt.jsonl.gz")], "gzip"),
        (["code", "--model", base, "--data", str(tmp_path / "bad_code.jsonl.gz")], "T/0 lacks"),
        (["code", "--model", base, "--temperature", "0", "--num-samples", "3", "--ks", "1"], "greedy"),
    ]
    for args, message in cases:
        if "--out" not in args:
            args = args + ["--out", str(tmp_path / "never")]
        code, captured = _run(args + ["--no-progress"], capsys)
        assert code == 2 and message in captured.err, (args, captured.err)
        assert not (tmp_path / "never").exists()


def test_code_fixture_flag_labels_the_report(saved_forms, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RASA_ALLOW_CODE_EVAL", "1")
    out = tmp_path / "code"
    code, captured = _run(["code", "--model", str(saved_forms / "merged"), "--limit", "1", "--num-samples", "1",
                           "--temperature", "0", "--ks", "1", "--max-new-tokens", "4", "--fixture",
                           "--out", str(out), "--no-progress"], capsys)
    assert code == 0, captured.err
    assert all(s["fixture"] for s in json.loads((out / "results.json").read_text())["scores"])
    assert "FIXTURE" in (out / "results.md").read_text()
