"""How much of a task an evaluation scored: every score says how many rows it stands on, and why the rest not.

A figure over fewer rows than the task holds (images that did not decode, labels outside the
task's class names, samples cut off with a damaged shard, rows the data reader left out) is
not the task's figure. `coverage` is recorded beside each score (``"coverage": {"rows",
"scored", "not_scored": {reason: count}}``) and `report_coverage` prints one warning line
whenever something was left out, so a smaller denominator is never silent.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

log = logging.getLogger(__name__)


def coverage(rows: int, not_scored: Mapping[str, int], note: str | None = None) -> dict[str, Any]:
    """``rows`` the task holds, of which those in ``not_scored`` (reason -> count, zeros dropped) were not scored.

    ``note``: what the count cannot know (e.g. the samples after the damage in a cut shard)."""
    left_out = {reason: int(n) for reason, n in not_scored.items() if n}
    found: dict[str, Any] = {"rows": int(rows), "scored": int(rows) - sum(left_out.values()), "not_scored": left_out}
    if note:
        found["note"] = note
    return found


def report_coverage(task: str, found: Mapping[str, Any]) -> None:
    """One warning line when the task scored fewer rows than it holds (or cannot tell how many it holds)."""
    if not found["not_scored"] and not found.get("note"):
        return
    why = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in found["not_scored"].items())
    note = f"; {found['note']}" if found.get("note") else ""
    log.warning("%s: scored %d of %d rows (not scored: %s%s)", task, found["scored"], found["rows"], why or "none", note)
