"""Checks and the outcome of an experiment run (result.json)."""

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Check:
    """One comparison of a measured value against its target, e.g. target="> 0.99"."""

    name: str
    value: float
    target: str
    passed: bool
    note: str = ""

    def as_dict(self) -> dict:
        value = self.value if isinstance(self.value, (int, str)) else float(self.value)
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        return {"name": self.name, "value": value, "target": self.target, "passed": bool(self.passed),
                "note": self.note}


def check_below(name: str, value: float, bound: float, note: str = "") -> Check:
    return Check(name, float(value), f"< {bound:g}", bool(value < bound), note)


def check_above(name: str, value: float, bound: float, note: str = "") -> Check:
    return Check(name, float(value), f"> {bound:g}", bool(value > bound), note)


def diverged_check(diverged: dict, name: str = "diverged_members") -> Check:
    """Passes when no sweep member diverged; diverged maps a member's label to the step its loss became non-finite."""
    return Check(name, len(diverged), "== 0", not diverged,
                 f"members frozen at their last finite state (member: step): {diverged or 'none'}; their train "
                 f"metrics stop there")


@dataclasses.dataclass
class Outcome:
    """What an experiment's run function returns: its checks and the figure files it wrote (relative to its dir)."""

    checks: list[Check]
    figures: list[str]
