"""The one place seap registers forward hooks: `hooked` adds them for the length of a `with` block and
removes every one when it exits, whatever happens inside (an exception, a generator closed early), so
no pass, mask or probe can leave a model computing something else afterwards."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Literal, Mapping

from torch import nn

Hook = tuple[nn.Module, Literal["pre", "post"], Callable]  # (module, when, fn) as torch's hook signatures


@contextmanager
def hooked(hooks: Iterable[Hook]) -> Iterator[None]:
    """Each (module, "pre", fn) as a forward pre-hook `fn(module, args)`, each (module, "post", fn) as a
    forward hook `fn(module, args, output)`; all removed on exit."""
    handles = []
    try:
        for mod, when, fn in hooks:
            if when not in ("pre", "post"):
                raise ValueError(f"a hook runs 'pre' or 'post' a module's forward, not {when!r}")
            handles.append(mod.register_forward_pre_hook(fn) if when == "pre" else mod.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def observing(modules: Mapping[str, nn.Module], sink: Callable[[object, object], None], *, output: bool = False,
              whole: bool = False) -> Iterator[None]:
    """Read-only hooks on `modules` (name -> module): `sink(name, x)` gets each call's first input, or
    its output with `output` (the first element of a tuple, or exactly what the module returned with
    `whole`)."""

    def pre(name):
        return lambda _m, args: sink(name, args[0])

    def post(name):
        return lambda _m, _args, out: sink(name, out[0] if isinstance(out, tuple) and not whole else out)

    with hooked((mod, "post", post(name)) if output else (mod, "pre", pre(name)) for name, mod in modules.items()):
        yield
