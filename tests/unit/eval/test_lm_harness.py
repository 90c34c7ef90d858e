"""lm-eval over the local tasks: log-likelihoods equal a direct forward pass, adapter forms agree,
a scripted model scores 1.0 (its reverse 0.0), reports carry sha256 / n / the fixture label.

Tolerances: per-request log-likelihood sums over <= ~60 tokens in fp32; lm-eval batches and pads
requests, our reference runs one unpadded sequence, so the two differ only by fp32 summation order
(~1e-7 relative per logit): 1e-5 relative (1e-5 absolute). Unmerged vs merged vs PEFT export: the
merged weight W + BDA is rounded once in fp32 and the PEFT path computes the same product in another
order, hence 1e-4.
"""
import copy
import json
import re

import pytest
import torch

from rasa_megatron import RaSAConfig, apply_rasa, export_peft_lora, merge_and_unload
from rasa_megatron.eval.fixtures import write_lm_fixtures
from rasa_megatron.eval.lm_harness import evaluate_lm, resolve_tasks
from rasa_megatron.eval.report import sha256_of, write_report


TASKS = ["hellaswag", "winogrande", "arc_challenge"]
METRICS = {"hellaswag": ("acc", "acc_norm"), "winogrande": ("acc",), "arc_challenge": ("acc", "acc_norm")}


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_fixtures")
    write_lm_fixtures(folder, n=5, seed=3)
    return folder


def _logliks(samples) -> dict:
    return {(task, s["doc_id"], i): ll for task, records in samples.items() for s in records
            for i, ll in enumerate(s["loglikelihoods"])}


def _direct_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """sum log p(continuation | context) in one forward pass, tokenised as lm-eval's HFLM does
    (trailing context spaces move to the continuation; continuation = whole[len(context):])."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_len = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits.double(), dim=-1)[0]
    targets = ids[0, context_len:]
    return logprobs[context_len - 1:-1].gather(1, targets[:, None]).sum().item()


def _rasa_model(tiny_llama, randomise_adapter, tokenizer, seed=0):
    model = apply_rasa(tiny_llama(tokenizer, seed), RaSAConfig(r=4, k=1, alpha=8))
    return randomise_adapter(model, seed=11, scale=0.3).eval()


@pytest.mark.parametrize("form", ["base", "rasa"])
def test_loglikelihoods_equal_a_direct_forward_pass(form, smollm2_tokenizer, fixture_dir, tiny_llama,
                                                    randomise_adapter):
    model = (tiny_llama(smollm2_tokenizer) if form == "base"
             else _rasa_model(tiny_llama, randomise_adapter, smollm2_tokenizer))
    scores, samples = evaluate_lm(model, smollm2_tokenizer, TASKS, fixture_dir, batch_size=4, fixture=True)
    checked = 0
    for task, records in samples.items():
        assert len(records) == 5
        for record in records:
            assert len(record["requests"]) == len(record["loglikelihoods"])
            for (context, continuation), loglik in zip(record["requests"], record["loglikelihoods"]):
                expected = _direct_loglik(model, smollm2_tokenizer, context, continuation)
                assert loglik == pytest.approx(expected, rel=1e-5, abs=1e-5), (task, record["doc_id"])
                checked += 1
    assert checked == 5 * (4 + 2 + 4)
    assert {(s["benchmark"], s["metric"]) for s in scores} == {(t, m) for t in TASKS for m in METRICS[t]}


def test_zero_b_adapter_changes_no_score(smollm2_tokenizer, fixture_dir, tiny_llama):
    base = tiny_llama(smollm2_tokenizer)
    base_scores, base_samples = evaluate_lm(base, smollm2_tokenizer, TASKS, fixture_dir)
    adapted = apply_rasa(copy.deepcopy(base), RaSAConfig(r=4, k=1, alpha=8))  # B = 0 at init
    scores, samples = evaluate_lm(adapted, smollm2_tokenizer, TASKS, fixture_dir)
    assert [s["value"] for s in scores] == [s["value"] for s in base_scores]
    base_ll, ll = _logliks(base_samples), _logliks(samples)
    assert base_ll.keys() == ll.keys()
    for key in ll:
        assert ll[key] == pytest.approx(base_ll[key], abs=1e-6)


def test_unmerged_merged_and_peft_export_agree(smollm2_tokenizer, fixture_dir, tmp_path, tiny_llama,
                                               randomise_adapter):
    from peft import PeftModel

    unmerged = _rasa_model(tiny_llama, randomise_adapter, smollm2_tokenizer)
    merged = merge_and_unload(copy.deepcopy(unmerged))
    export_peft_lora(unmerged, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(tiny_llama(smollm2_tokenizer), str(tmp_path / "peft")).eval()
    reference = _logliks(evaluate_lm(unmerged, smollm2_tokenizer, TASKS, fixture_dir)[1])
    base = _logliks(evaluate_lm(tiny_llama(smollm2_tokenizer), smollm2_tokenizer, TASKS, fixture_dir)[1])
    assert max(abs(reference[k] - base[k]) for k in reference) > 1e-2  # the adapter does change the scores
    for other in (merged, peft_model):
        found = _logliks(evaluate_lm(other, smollm2_tokenizer, TASKS, fixture_dir)[1])
        assert found.keys() == reference.keys()
        for key in reference:
            assert found[key] == pytest.approx(reference[key], abs=1e-4), key


def _gold(doc) -> int:
    """The gold choice straight from the Hugging Face schema of each data set."""
    if "endings" in doc:
        return int(doc["label"])
    if "option1" in doc:
        return int(doc["answer"]) - 1
    return doc["choices"]["label"].index(doc["answerKey"])


def _scripted_lm(reverse: bool):
    from lm_eval.api.model import LM

    class ScriptedLM(LM):
        """Knows the gold answer of each document: 0 nats for it and -10 for the rest (or reversed)."""

        def loglikelihood(self, requests, disable_tqdm=False):
            results = []
            for request in requests:
                right = request.idx == _gold(request.doc)
                results.append((-10.0 if right == reverse else 0.0, right != reverse))
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError("not used by multiple-choice tasks")

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError("not used by multiple-choice tasks")

    return ScriptedLM()


@pytest.mark.parametrize("reverse, expected", [(False, 1.0), (True, 0.0)])
def test_scripted_model_scores_one_and_its_reverse_zero(reverse, expected, fixture_dir, tmp_path):
    scores, _ = evaluate_lm(_scripted_lm(reverse), None, TASKS, fixture_dir, fixture=True)
    assert len(scores) == 5
    for s in scores:
        assert s["value"] == expected, s
        assert s["n"] == 5 and s["fixture"] is True
        assert s["data_sha256"] == sha256_of(fixture_dir / f"{s['benchmark']}.jsonl")
    written = write_report(tmp_path / "report", scores, {"model": "scripted"})
    assert json.loads(written["json"].read_text())["scores"] == scores
    table = written["markdown"].read_text()
    assert table.count("FIXTURE data, not the benchmark") == 5 and scores[0]["data_sha256"][:12] in table


def test_limit_and_bad_requests(fixture_dir, tmp_path):
    scores, samples = evaluate_lm(_scripted_lm(False), None, ["arc_challenge"], fixture_dir, limit=2)
    assert [s["n"] for s in scores] == [2, 2] and len(samples["arc_challenge"]) == 2
    with pytest.raises(ValueError, match=r"unknown lm-eval task.*'mmlu'.*valid"):
        resolve_tasks(["mmlu"], fixture_dir)
    with pytest.raises(FileNotFoundError, match="hellaswag.jsonl"):
        resolve_tasks(["hellaswag"], tmp_path)
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate_lm(torch.nn.Linear(2, 2), None, TASKS, fixture_dir)


def test_network_is_blocked_in_this_suite():
    import socket

    with pytest.raises(RuntimeError, match="offline"):
        socket.create_connection(("127.0.0.1", 9))
    with pytest.raises(RuntimeError, match="offline"):
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(("127.0.0.1", 9))


def test_fixture_directories_are_labelled_without_the_flag(fixture_dir):
    scores, _ = evaluate_lm(_scripted_lm(False), None, ["winogrande"], fixture_dir)
    assert all(s["fixture"] for s in scores)


def test_few_shot_examples_come_from_the_training_split_only(fixture_dir, tmp_path):
    import shutil

    with pytest.raises(FileNotFoundError, match="arc_challenge_train.jsonl"):
        evaluate_lm(_scripted_lm(False), None, ["arc_challenge"], fixture_dir, num_fewshot=2)
    data = tmp_path / "data"
    shutil.copytree(fixture_dir, data)
    train = [{"id": f"train_{i}", "question": f"Training question number {i}?",
              "choices": {"text": ["yes", "no"], "label": ["A", "B"]}, "answerKey": "A"} for i in range(4)]
    (data / "arc_challenge_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    scores, samples = evaluate_lm(_scripted_lm(False), None, ["arc_challenge"], data, num_fewshot=2)
    scored = [json.loads(line)["question"] for line in (data / "arc_challenge.jsonl").read_text().splitlines()]
    for record in samples["arc_challenge"]:
        context = record["requests"][0][0]
        assert context.count("Training question number") == 2
        assert sum(q in context for q in scored) == 1  # only the document's own question, once, at the end
    assert all(s["num_fewshot"] == 2 and s["value"] == 1.0 for s in scores)


@pytest.mark.parametrize("task, record, message", [
    ("winogrande", {"sentence": "no blank here", "option1": "a", "option2": "b", "answer": "1"}, "'_' blank"),
    ("winogrande", {"sentence": "a _ b", "option1": "a", "answer": "1"}, "missing ['option2']"),
    ("hellaswag", {"activity_label": "x", "ctx_a": "a", "ctx_b": "b", "endings": ["e"], "label": "3"}, "label"),
    ("arc_challenge", {"question": "q", "choices": {"text": ["t"], "label": ["A"]}, "answerKey": "B"}, "answerKey"),
])
def test_bad_documents_are_named_by_file_and_line(fixture_dir, tmp_path, task, record, message):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(fixture_dir, data)
    path = data / f"{task}.jsonl"
    path.write_text(path.read_text() + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=rf"{task}.jsonl:6: .*{re.escape(message)}"):
        resolve_tasks([task], data)
