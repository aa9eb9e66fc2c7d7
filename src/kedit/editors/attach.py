"""Live attachments of added-capacity editors: one forward hook per (model, method).

Editors that *add* parameters (T-Patcher's patch neurons, a sparse residual memory) keep them in
their :class:`~kedit.editors.base.EditorState` and put them on the live model as a forward hook on
one module. The registry here makes that idempotent: installing a method's hook on a model first
removes the one it had, so attaching after every batch never adds the same computation twice, and
:func:`suspended` takes it off while an editor reads the base model's activations.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

_ATTACHED: weakref.WeakKeyDictionary[nn.Module, dict[str, Attachment]] = weakref.WeakKeyDictionary()


@dataclass
class Attachment:
    """One installed hook: ``remove()`` takes it off and forgets it (calling it twice is harmless)."""

    model: nn.Module
    method: str
    module_name: str
    hook: Callable[..., Any]
    # further hooks installed and removed with the main one: (module name, "pre" | "post", hook), with kwargs
    extra: tuple[tuple[str, str, Callable[..., Any]], ...] = ()
    _handle: Any = field(default=None, repr=False)
    _extra_handles: list[Any] = field(default_factory=list, repr=False)

    @property
    def active(self) -> bool:
        return self._handle is not None

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for h in self._extra_handles:
            h.remove()
        self._extra_handles = []
        per_model = _ATTACHED.get(self.model)
        if per_model is not None and per_model.get(self.method) is self:
            del per_model[self.method]

    def _install(self) -> None:
        modules = dict(self.model.named_modules())
        for name in (self.module_name, *(e[0] for e in self.extra)):
            if name not in modules:
                raise KeyError(f"{type(self.model).__name__} has no module {name!r} to attach {self.method} to")
        self._handle = modules[self.module_name].register_forward_hook(self.hook, with_kwargs=True)
        for name, kind, hook in self.extra:
            reg = modules[name].register_forward_pre_hook if kind == "pre" else modules[name].register_forward_hook
            self._extra_handles.append(reg(hook, with_kwargs=True))


def install(model: nn.Module, method: str, module_name: str, hook: Callable[..., Any],
            extra: tuple[tuple[str, str, Callable[..., Any]], ...] = ()) -> Attachment:
    """Register ``hook`` (``hook(module, args, kwargs, output) -> output``) on ``module_name``, and the
    ``extra`` hooks (``(module name, "pre" | "post", hook)``; ``""`` is the model itself), replacing
    any hooks ``method`` had on ``model``."""
    detach(model, method)
    att = Attachment(model, method, module_name, hook, tuple(extra))
    att._install()
    _ATTACHED.setdefault(model, {})[method] = att
    return att


def attached(model: nn.Module, method: str) -> Attachment | None:
    """The method's live attachment on ``model``, if any."""
    return _ATTACHED.get(model, {}).get(method)


def detach(model: nn.Module, method: str) -> bool:
    """Remove ``method``'s hook from ``model``; True when there was one."""
    att = attached(model, method)
    if att is None:
        return False
    att.remove()
    return True


@contextlib.contextmanager
def suspended(model: nn.Module, method: str) -> Iterator[Attachment | None]:
    """Take ``method``'s hook off inside the block (the base model runs) and put the same hook back
    on exit, error or not, unless something else attached the method meanwhile."""
    att = attached(model, method)
    if att is not None:
        att.remove()
    try:
        yield att
    finally:
        if att is not None and attached(model, method) is None:  # the caller's handle stays valid
            att._install()
            _ATTACHED.setdefault(model, {})[method] = att
