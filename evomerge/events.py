"""What a running search tells its caller: progress after each trial and a line per step. Light (no torch), so
the command line can show it without loading the search stack until a search runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from evomerge.search import Search


@dataclass
class Progress:
    """Where a search stands: trials done of the budget, the best full-fidelity score so far, workers."""

    done: int
    budget: int
    best: float | None
    busy: int  # workers with a candidate in flight
    workers: int  # workers alive


class SearchEvents:
    """What ``run_search`` tells its caller as it goes. Each method is called from the driver's thread, in the
    order below; this base ignores them all (scripts and tests), the CLI shows them."""

    def begun(self, search: Search) -> None:
        """The run folder is prepared and the study open: from here on a failure leaves a resumable run."""

    def say(self, line: str) -> None:
        """One line about the step that starts now (where the inputs live, choosing the subset, the re-check)."""

    def progress(self, progress: Progress) -> None:
        """Before the first trial and after each trial told."""

    def searched(self) -> None:
        """The budget is spent: no more ``progress`` calls."""
