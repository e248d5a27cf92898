"""The progress line of a run of many steps: which step runs and how long the rest should take."""

from __future__ import annotations


class Progress:
    """The study's progress line: which step runs and how long the rest should take.

    The rest is estimated from the steps' expected minutes (`DataStep.minutes`, `Method.minutes`),
    each kind of step (data, fit) scaled by how long the steps of that kind done in this call took
    against their estimates, so a slower machine sees its own pace; steps without an estimate count
    as the mean of those of their kind (or of any) done. A step skipped as finished earlier takes
    seconds and does not count.
    """

    def __init__(self, expected: list[float | None], kinds: list[str] | None = None) -> None:
        self.expected, self.took = expected, [None] * len(expected)
        self.kinds = kinds or ["step"] * len(expected)

    def done(self, i: int, minutes: float) -> None:
        if minutes > 0.05:  # a skipped step says nothing of the pace
            self.took[i] = minutes

    def _steps(self, kind: str | None = None) -> list[int]:
        return [j for j, k in enumerate(self.kinds) if kind is None or k == kind]

    def _pace(self, kind: str) -> float:
        timed = [j for j in self._steps(kind) if self.took[j] is not None and self.expected[j] is not None]
        return sum(self.took[j] for j in timed) / sum(self.expected[j] for j in timed) if timed else 1.0

    def _typical(self, kind: str) -> float | None:
        for steps in (self._steps(kind), self._steps()):
            done = [self.took[j] for j in steps if self.took[j] is not None]
            if done:
                return sum(done) / len(done)
            known = [self.expected[j] for j in steps if self.expected[j] is not None]
            if known:
                return self._pace(kind) * sum(known) / len(known)
        return None

    def rest(self, i: int) -> float | None:
        """Minutes expected for steps i.. (None before there is anything to go by)."""
        total = 0.0
        for j in range(i, len(self.expected)):
            kind = self.kinds[j]
            minutes = (self._pace(kind) * self.expected[j] if self.expected[j] is not None
                       else self._typical(kind))
            if minutes is None:
                return None
            total += minutes
        return total

    def line(self, i: int, label: str) -> str:
        rest = self.rest(i)
        eta = f"; about {rest:.0f} min to go" if rest is not None else ""
        return f"[study] step {i + 1}/{len(self.expected)}: {label}{eta}"
