"""The one error type users see: a bad spec, recipe or model set, reported in one line (exit code 2)."""


class SpecError(Exception):
    """Input that cannot be merged or searched; raised before any compute starts."""
