"""Batched generation for the generative benchmarks (math, code): greedy or sampled, left-padded,
with stop strings, tqdm progress and a fixed seed."""
from __future__ import annotations

import torch


def truncate_at_stop(text: str, stop: list[str] | tuple[str, ...]) -> str:
    """``text`` up to the earliest occurrence of any stop string (exclusive)."""
    cut = len(text)
    for s in stop:
        index = text.find(s)
        if index != -1:
            cut = min(cut, index)
    return text[:cut]


def decode_continuation(tokenizer, row: list[int], prompt_length: int) -> str:
    """The text ``row[prompt_length:]`` adds to ``row[:prompt_length]``, decoded in context: decoding
    the new tokens alone drops a SentencePiece tokenizer's leading space (``"▁▁▁▁return"`` alone
    decodes to three spaces), which breaks indentation in generated code."""
    prompt = tokenizer.decode(row[:prompt_length], skip_special_tokens=True)
    full = tokenizer.decode(row, skip_special_tokens=True)
    if full.startswith(prompt):
        return full[len(prompt):]
    return tokenizer.decode(row[prompt_length:], skip_special_tokens=True)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, batch_size: int = 16, max_new_tokens: int = 512,
             temperature: float = 0.0, top_p: float = 1.0, num_samples: int = 1, seed: int = 0,
             stop: list[str] | tuple[str, ...] = (), progress: bool = True, desc: str = "generate") -> list[list[str]]:
    """``num_samples`` completions per prompt (``[len(prompts)][num_samples]``), prompt excluded and
    cut at the first stop string. ``temperature == 0`` is greedy (then ``num_samples`` must be 1).
    Prompts are tokenized with the tokenizer's own special tokens (BOS where it adds one, as HFLM does)."""
    from tqdm.auto import tqdm

    if batch_size <= 0 or max_new_tokens <= 0 or num_samples <= 0:
        raise ValueError(f"batch_size, max_new_tokens and num_samples must be positive, got "
                         f"{batch_size}, {max_new_tokens}, {num_samples}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0 and num_samples != 1:
        raise ValueError(f"greedy decoding gives one completion per prompt; num_samples={num_samples} "
                         "needs temperature > 0 (the paper: 0.2)")
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature,
                                                               "top_p": top_p, "top_k": 0}
    if stop:
        sampling.update(stop_strings=list(stop), tokenizer=tokenizer)
    device = next(model.parameters()).device
    outputs: list[list[str]] = []
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
            batch = prompts[start:start + batch_size]
            encoded = tokenizer(batch, return_tensors="pt", padding=True).to(device)
            generated = model.generate(**encoded, max_new_tokens=max_new_tokens, num_return_sequences=num_samples,
                                       pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id, **sampling)
            width = encoded["input_ids"].shape[1]
            texts = [decode_continuation(tokenizer, row.tolist(), width) for row in generated]
            for i in range(len(batch)):
                outputs.append([truncate_at_stop(t, stop) for t in texts[i * num_samples:(i + 1) * num_samples]])
    finally:
        torch.random.set_rng_state(generator_state)
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return outputs
