"""Document functions of the local lm-eval tasks (the stock HellaSwag / WinoGrande definitions:
same preprocessing, same choices, same gold), loaded by lm-eval through ``!function``."""
import re


def hellaswag_clean(text: str) -> str:
    """Strip WikiHow's bracketed artefacts (``[title]`` becomes a sentence break)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_process_docs(dataset):
    """Add ``query`` (label: context), ``choices`` (4 cleaned endings) and ``gold``."""
    def one(doc):
        context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": hellaswag_clean(doc["activity_label"] + ": " + context),
                "choices": [hellaswag_clean(ending) for ending in doc["endings"]], "gold": int(doc["label"])}

    return dataset.map(one)


def winogrande_doc_to_text(doc) -> int:
    """Index of the gold context ("1" -> 0, "2" -> 1): the contexts are the choices."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc) -> str:
    """The sentence after the blank: the continuation scored under every context."""
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def winogrande_doc_to_choice(doc) -> list[str]:
    """The sentence up to the blank, completed by each option."""
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]
