"""The `seap` command: `args` builds the argument parser (one function per command), `commands` turns
flags into configs, makes one seap.api call and prints its result. Nothing in seap imports this package
but `python -m seap` (seap/__main__.py)."""

from .commands import main

__all__ = ["main"]
