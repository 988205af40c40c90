"""Errors the CLI turns into a one-line message and exit code 2 (no traceback)."""


class UsageError(Exception):
    """Bad input from the user: a config typo, a missing file, an unknown source. Exit code 2, one line."""


class ConfigError(UsageError):
    """A config file or override that does not validate; the message names file, key and expected type."""
