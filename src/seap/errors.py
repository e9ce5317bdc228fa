"""Errors that reach the user as one clear line (the CLI prints ``str(err)`` and exits 2).

Every message says what is wrong and how to fix it.
"""

from __future__ import annotations


class SeapError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in seap."""


class ConfigError(SeapError, ValueError):
    """An option is out of range or inconsistent."""


class DataError(SeapError, ValueError):
    """A corpus or data file is missing, empty or malformed."""


class ModelError(SeapError, ValueError):
    """A model cannot be found, loaded or is of an unsupported architecture."""


class ArtifactError(SeapError, ValueError):
    """A statistics file, plan or pruned folder is corrupt, truncated or belongs to another model."""


class BusyError(SeapError):
    """Another seap run holds the output folder's lock."""
