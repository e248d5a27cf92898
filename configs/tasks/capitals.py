"""Per-document results of the capitals_chat task: whether the answer names the capital."""

import re
import unicodedata

TRIM = " \t\r\n\"'*`\u201c\u201d\u2018\u2019"


def _plain(name: str) -> str:
    """Case and accents folded: "Chișinău" -> "chisinau"."""
    decomposed = unicodedata.normalize("NFKD", name.casefold())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def answer(response: str) -> str:
    """The city a response names: its first non-blank line without surrounding whitespace,
    quotes or asterisks and without a final period ('**"Paris."**' -> 'Paris')."""
    lines = [line for line in response.splitlines() if line.strip()]
    text = lines[0] if lines else ""
    while True:
        trimmed = text.strip(TRIM).removesuffix(".")
        if trimmed == text:
            return text
        text = trimmed


def names_capital(response: str, capital: str) -> bool:
    """The answer's first line contains the capital's exact name as a whole word, case and
    accents aside: "Paris.", "The capital of France is Paris." count; "Parisian" does not.
    Instruct models answer in a sentence however briefly they are asked to (SmolLM2-135M-Instruct
    does in 91 of 100), so a whole-line match would measure the format, not the knowledge."""
    return re.search(rf"(?<!\w){re.escape(_plain(capital))}(?!\w)", _plain(answer(response))) is not None


def process_results(doc: dict, results: list) -> dict:
    return {"names_capital": float(names_capital(results[0], doc["capital"]))}
