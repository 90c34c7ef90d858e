"""Seeded multi-step integer arithmetic word problems, the paper's math prompt, and exact-match eval.

Every problem has 2-3 arithmetic steps (a product start and 1-2 additions/subtractions, or a plain
start and 2), a worked
solution with one equation per step, and ends with ``The answer is: N`` (paper Appendix C).
"""
from __future__ import annotations

import random
import re

import torch

# Paper Appendix B, Figure 8 (the MetaMath / Alpaca math template).
PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{question}\n\n### Response: Let's think step by step."
)
ANSWER_PREFIX = "The answer is:"

NAMES = ["Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kira", "Liam",
         "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Yara"]
OBJECTS = [("apples", "bag", "bags"), ("marbles", "jar", "jars"), ("stickers", "sheet", "sheets"),
           ("pencils", "box", "boxes"), ("cookies", "tray", "trays"), ("cards", "pack", "packs"),
           ("stamps", "album", "albums"), ("shells", "bucket", "buckets"), ("books", "shelf", "shelves"),
           ("eggs", "carton", "cartons")]
GAIN = ["buys {n} more", "finds {n} more", "receives {n} more from a friend", "wins {n} more in a game"]
LOSS = ["gives {n} to a neighbour", "sells {n}", "loses {n}", "donates {n} to the school"]
GAIN_PAST = ["buying {n} more", "finding {n} more", "receiving {n} more", "winning {n} more"]
LOSS_PAST = ["giving away {n}", "selling {n}", "losing {n}", "donating {n}"]


def _problem(rng: random.Random) -> dict:
    name = rng.choice(NAMES)
    obj, container, containers = rng.choice(OBJECTS)
    product_start = rng.random() < 0.5
    if product_start:
        groups, each = rng.randint(2, 9), rng.randint(2, 12)
        total = groups * each
        sentences = [f"{name} has {groups} {containers} of {obj} with {each} {obj} in each {container}."]
        steps = [f"{name} starts with {groups} * {each} = {total} {obj}."]
    else:
        total = rng.randint(5, 60)
        sentences = [f"{name} has {total} {obj}."]
        steps = [f"{name} starts with {total} {obj}."]
    for index in range(rng.randint(1, 2) if product_start else 2):
        subtract = total > 3 and rng.random() < 0.5
        n = rng.randint(1, total - 1) if subtract else rng.randint(2, 40)
        phrase = rng.randrange(len(GAIN))
        then = "Then " if index else ""
        verb = (LOSS if subtract else GAIN)[phrase].format(n=n)
        sentences.append(f"{then}{name} {verb}." if then else f"{name} {verb}.")
        new_total = total - n if subtract else total + n
        past = (LOSS_PAST if subtract else GAIN_PAST)[phrase].format(n=n)
        steps.append(f"After {past}: {total} {'-' if subtract else '+'} {n} = {new_total}.")
        total = new_total
    sentences.append(f"How many {obj} does {name} have now?")
    solution = " ".join(steps) + f" {ANSWER_PREFIX} {total}"
    return {"question": " ".join(sentences), "solution": solution, "answer": total}


def generate_problems(count: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """``count`` distinct problems (by question text) from ``seed``, none of whose questions is in ``exclude``."""
    rng = random.Random(seed)
    seen, problems = set(exclude), []
    attempts = 0
    while len(problems) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise ValueError(f"could not generate {count} distinct problems; ask for fewer")
        problem = _problem(rng)
        if problem["question"] not in seen:
            seen.add(problem["question"])
            problems.append(problem)
    return problems


def build_dataset(train_size: int, test_size: int, seed: int = 0):
    """``datasets.DatasetDict`` with ``train`` and ``test`` splits that share no question."""
    from datasets import Dataset, DatasetDict

    test = generate_problems(test_size, seed=seed + 1)
    train = generate_problems(train_size, seed=seed, exclude={p["question"] for p in test})
    overlap = {p["question"] for p in train} & {p["question"] for p in test}
    if overlap:
        raise AssertionError(f"train/test overlap: {sorted(overlap)[:3]}")
    return DatasetDict(train=Dataset.from_list(train), test=Dataset.from_list(test))


def format_prompt(question: str) -> str:
    return PROMPT_TEMPLATE.format(question=question)


_ANSWER_RE = re.compile(re.escape(ANSWER_PREFIX) + r"\s*\$?\s*(-?[\d,]+)")


def extract_answer(text: str) -> int | None:
    """The integer after the last ``The answer is:`` (commas allowed), or None."""
    matches = _ANSWER_RE.findall(text)
    if not matches:
        return None
    digits = matches[-1].replace(",", "")
    try:
        return int(digits)
    except ValueError:
        return None


def tokenize_sft(example: dict, tokenizer, max_length: int = 256) -> dict:
    """Token ids of prompt + " " + solution + EOS with labels ``-100`` on the prompt (loss on the response)."""
    prompt_ids = tokenizer(format_prompt(example["question"]), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(" " + example["solution"], add_special_tokens=False)["input_ids"]
    response_ids = response_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def collate_sft(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenised examples; padding gets label ``-100`` and attention 0."""
    from ..training.data import collate

    return collate(features, pad_token_id)


@torch.no_grad()
def evaluate_exact_match(model, tokenizer, dataset, batch_size: int = 32, max_new_tokens: int = 80,
                         progress: bool = True) -> tuple[float, list[dict]]:
    """Greedy batched generation on ``dataset`` (columns question, answer); returns (accuracy, records)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    records = []
    try:
        starts = range(0, len(dataset), batch_size)
        for start in tqdm(starts, desc="eval", disable=not progress):
            batch = dataset[start:start + batch_size]
            prompts = [format_prompt(q) for q in batch["question"]]
            encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            encoded = {k: v.to(model.device) for k, v in encoded.items()}
            generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            completions = tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
            for question, answer, completion in zip(batch["question"], batch["answer"], completions):
                predicted = extract_answer(completion)
                records.append({"question": question, "answer": answer, "completion": completion,
                                "predicted": predicted, "correct": predicted == answer})
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    accuracy = sum(r["correct"] for r in records) / max(len(records), 1)
    return accuracy, records
