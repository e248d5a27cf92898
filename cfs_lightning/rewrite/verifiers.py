"""Verifiers: is a self-generated response correct for its task record?

Self-Output and Rephrase (arXiv 2501.14315) keep a model-written response only when it reaches the
reference answer. A verifier is any object with `__call__(response, record) -> bool`; subclass
`Verifier` and name it in YAML (`verifier: {class_path: my_pkg.MyVerifier, init_args: ...}`).
A verifier that raises stops the generation with the record named: a broken verifier must not
quietly turn into "nothing verified".
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from decimal import Decimal, InvalidOperation


class VerifierError(ValueError):
    """A reference answer cannot be read as the verifier is configured."""


class Verifier(ABC):
    """Decides whether a generated response is correct for a task record."""

    @abstractmethod
    def __call__(self, response: str, record: dict) -> bool:
        """True when `response` (generated text, special tokens removed) answers `record`."""


class GSM8KAnswer(Verifier):
    """Exact numeric match of the final `#### <number>` line (GSM8K's answer format).

    The last `####` number of the response is compared with the reference's, ignoring thousands
    separators, a leading `$` and trailing zeros (`1,000.0` equals `1000`). A response without
    one is wrong.
    """

    PATTERN = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")

    def __init__(self, reference_field: str = "answer") -> None:
        """
        Args:
            reference_field: Record field holding the reference solution that ends in `#### N`.
        """
        self.reference_field = reference_field

    def __call__(self, response: str, record: dict) -> bool:
        expected = self._number(_field(record, self.reference_field))
        if expected is None:
            raise VerifierError(
                f"reference {self.reference_field}={record[self.reference_field]!r} has no "
                "`#### <number>` answer; use RegexMatch for other answer formats"
            )
        return self._number(response) == expected

    def _number(self, text: str) -> Decimal | None:
        found = self.PATTERN.findall(text)
        if not found:
            return None
        try:
            return Decimal(found[-1].replace(",", "")).normalize()
        except InvalidOperation:
            return None


class RegexMatch(Verifier):
    """The last match of `pattern` in the response equals its last match in the reference.

    The compared value is the pattern's first group when it has one, else the whole match, with
    surrounding whitespace stripped (and case folded with `ignore_case`).
    """

    def __init__(self, pattern: str, reference_field: str, ignore_case: bool = False) -> None:
        """
        Args:
            pattern: Regular expression locating the answer, e.g. `The answer is (\\w+)`.
            reference_field: Record field holding the reference answer text.
            ignore_case: Match and compare without regard to case.
        """
        self.regex = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
        self.reference_field, self.ignore_case = reference_field, ignore_case

    def __call__(self, response: str, record: dict) -> bool:
        expected = self._answer(_field(record, self.reference_field))
        if expected is None:
            raise VerifierError(
                f"pattern {self.regex.pattern!r} does not match the reference "
                f"{self.reference_field}={record[self.reference_field]!r}; fix the pattern"
            )
        return self._answer(response) == expected

    def _answer(self, text: str) -> str | None:
        matches = list(self.regex.finditer(text))
        if not matches:
            return None
        last = matches[-1]
        value = (last.group(1) if self.regex.groups else last.group(0)).strip()
        return value.casefold() if self.ignore_case else value


def _field(record: dict, name: str) -> str:
    if name not in record:
        raise VerifierError(f"task records have no field {name!r} (fields: {sorted(record)}); "
                            "set the verifier's reference_field")
    return str(record[name])
