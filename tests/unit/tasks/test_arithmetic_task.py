"""The default job's data: determinism, disjoint splits, correct worked answers, masking, extraction."""
import re

import pytest
import torch

from rasa_megatron.tasks.arithmetic import (ANSWER_PREFIX, build_dataset, collate_sft, extract_answer,
                                            format_prompt, generate_problems, tokenize_sft)


def test_generator_is_deterministic_per_seed():
    assert generate_problems(20, seed=3) == generate_problems(20, seed=3)
    assert generate_problems(20, seed=3) != generate_problems(20, seed=4)


def test_splits_do_not_overlap_and_have_requested_sizes():
    data = build_dataset(600, 100, seed=0)
    assert len(data["train"]) == 600 and len(data["test"]) == 100
    assert not set(data["train"]["question"]) & set(data["test"]["question"])
    assert len(set(data["train"]["question"])) == 600


def test_every_worked_step_is_correct_and_ends_with_the_answer():
    for problem in generate_problems(300, seed=1):
        equations = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", problem["solution"])
        assert 1 <= len(equations) <= 3 and len(equations) + ("starts with" in problem["solution"]) >= 2
        for left, op, right, result in equations:
            assert eval(f"{left} {op} {right}") == int(result), problem  # noqa: S307 - digits and one operator
        assert problem["solution"].endswith(f"{ANSWER_PREFIX} {problem['answer']}")
        assert problem["answer"] >= 0
        assert extract_answer(problem["solution"]) == problem["answer"]


@pytest.mark.parametrize("text,expected", [
    ("... The answer is: 42", 42),
    ("The answer is: 1,234.", 1234),
    ("The answer is: -7", -7),
    ("The answer is: 3. Wait. The answer is: 5", 5),
    ("The answer is:  $12", 12),
    ("the answer is 42", None),
    ("The answer is: many", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_prompt_is_the_paper_template():
    prompt = format_prompt("What is 2 + 3?")
    assert prompt.startswith("Below is an instruction that describes a task. Write a response that "
                             "appropriately completes the request.\n\n### Instruction:\nWhat is 2 + 3?")
    assert prompt.endswith("\n\n### Response: Let's think step by step.")


class CharTokenizer:
    """A stand-in with the tokenizer interface tokenize_sft uses: one id per character."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_labels_are_masked_to_the_response_and_padding():
    example = {"question": "Ann has 2 cats. How many?", "solution": "2 + 0 = 2. The answer is: 2"}
    features = tokenize_sft(example, CharTokenizer())
    prompt_len = len(format_prompt(example["question"]))
    assert features["labels"][:prompt_len] == [-100] * prompt_len
    assert features["labels"][prompt_len:] == features["input_ids"][prompt_len:]
    assert "".join(chr(i) for i in features["input_ids"][prompt_len:-1]) == " " + example["solution"]
    assert features["input_ids"][-1] == 0
    short = tokenize_sft({"question": "q", "solution": "s"}, CharTokenizer())
    batch = collate_sft([features, short], pad_token_id=0)
    n = len(short["input_ids"])
    assert batch["input_ids"].shape == (2, len(features["input_ids"]))
    assert torch.all(batch["labels"][1, n:] == -100) and torch.all(batch["attention_mask"][1, n:] == 0)
    assert torch.all(batch["attention_mask"][0] == 1)
