"""Generation decodes completions in context: a SentencePiece-style (Metaspace) tokenizer drops the
leading space of a continuation decoded alone, which would break every indented HumanEval body."""
import pytest

from rasa_megatron.eval.generation import decode_continuation, truncate_at_stop


@pytest.fixture(scope="module")
def metaspace_tokenizer():
    """A small BPE tokenizer with Llama-2 / Mistral-style Metaspace pre-tokenization, trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = ["def f(x):\n    return x", "    return x + 1", "def g(y):\n    return y * 2"] * 20
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>")


def test_continuation_keeps_its_leading_space(metaspace_tokenizer):
    prompt, body = "def f(x):\n", "    return x"
    ids = metaspace_tokenizer(prompt + body, add_special_tokens=False)["input_ids"]
    prompt_length = len(metaspace_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert metaspace_tokenizer.decode(ids[:prompt_length]) == prompt
    alone = metaspace_tokenizer.decode(ids[prompt_length:], skip_special_tokens=True)
    assert alone != body  # the bug this guards against: the slice alone loses a space
    assert decode_continuation(metaspace_tokenizer, ids, prompt_length) == body


def test_truncate_at_the_earliest_stop():
    assert truncate_at_stop("a\ndef b\nclass c", ["\nclass", "\ndef"]) == "a"
    assert truncate_at_stop("no stop", ["\ndef"]) == "no stop"
