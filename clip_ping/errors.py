"""User-facing errors.

Anything a user can cause (bad path, bad config key, mismatched bank) raises
`ClipPingError`; the CLI prints its message on one line and exits with code 2,
never a traceback.
"""


class ClipPingError(Exception):
    """An error caused by input or configuration, reported without a traceback."""


class ConfigError(ClipPingError):
    """An unknown or invalid configuration key or value."""


class DataError(ClipPingError):
    """Unreadable, missing or inconsistent data (data set, bank, neighbour table)."""
