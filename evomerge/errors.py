"""The errors users see, each reported in one line: bad input (exit code 2) and a search that cannot go on (1)."""


class SpecError(Exception):
    """Input that cannot be merged or searched; raised before any compute starts."""


class SearchError(RuntimeError):
    """The search cannot go on (repeated failures, exhausted space)."""
