"""Documents and per-document results of the gsm8k_accuracy task."""

import re
from decimal import Decimal, InvalidOperation

FIRST_DOCS = 100
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def first_docs(dataset):
    """The first `FIRST_DOCS` test documents (inside gsm8k_answers' test documents)."""
    return dataset.select(range(FIRST_DOCS))


def final_number(text: str) -> Decimal | None:
    """The number a text ends on: the first after "####" if it has one, else its last number;
    commas dropped ("so 1,200 dollars" -> 1200). None when there is none."""
    head, marker, tail = text.partition("####")
    numbers = NUMBER.findall(tail)[:1] if marker else NUMBER.findall(head)[-1:]
    if not numbers:
        return None
    try:
        return Decimal(numbers[0].replace(",", ""))
    except InvalidOperation:
        return None


def process_results(doc: dict, results: list) -> dict:
    predicted, reference = final_number(results[0]), final_number(doc["answer"])
    return {"accuracy": float(predicted is not None and predicted == reference)}
