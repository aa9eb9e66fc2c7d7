"""The one hook primitive: read or patch named modules' inputs/outputs inside a ``with`` block.

Key collection, v* optimisation, block-slice capture, causal tracing and statistics all use
:class:`Trace`, so hook bookkeeping (registration, removal on error, tuple outputs, keyword
arguments) lives in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

EditFn = Callable[[str, torch.Tensor], torch.Tensor | None]
# a module's first input, when a caller passes it by keyword (transformer blocks: ``hidden_states``)
INPUT_KWARG = "hidden_states"


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple | list) else x


def _replace_first(x: Any, new: torch.Tensor) -> Any:
    if isinstance(x, tuple):
        return (new, *x[1:])
    if isinstance(x, list):
        return [new, *x[1:]]
    return new


class Trace:
    """Hooks on modules ``names`` of ``model``.

    - ``retain_input`` / ``retain_output``: keep the (first) input / output tensor per module
      in ``self.inputs[name]`` / ``self.outputs[name]`` (detached unless ``detach=False``).
    - ``edit_input`` / ``edit_output``: ``fn(name, tensor) -> tensor | None`` may return a
      replacement (``None`` keeps the original); used to patch states by index.
    - ``retain_call``: keep each module's other call arguments, ``self.calls[name] = (args, kwargs)``
      without the first input (not detached: masks, rotary tables, caches), so the module can be
      called again exactly as its model called it.
    - ``stop``: raise after the last traced module so the rest of the network is skipped;
      ``stop_before``: raise once every traced module has been *entered*, so the last one never runs.

    The first input is the first positional argument, or the ``hidden_states`` keyword when the
    call passes none.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str],
        *,
        retain_input: bool = False,
        retain_output: bool = False,
        edit_input: EditFn | None = None,
        edit_output: EditFn | None = None,
        detach: bool = True,
        stop: bool = False,
        retain_call: bool = False,
        stop_before: bool = False,
    ) -> None:
        self.model = model
        self.names = list(dict.fromkeys(names))
        self.retain_input = retain_input
        self.retain_output = retain_output
        self.edit_input = edit_input
        self.edit_output = edit_output
        self.detach = detach
        self.stop = stop
        self.retain_call = retain_call
        self.stop_before = stop_before
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.calls: dict[str, tuple[tuple, dict[str, Any]]] = {}
        self._handles: list[Any] = []
        self._remaining: set[str] = set()
        self._unentered: set[str] = set()

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach() if self.detach else t

    def __enter__(self) -> Trace:
        modules = dict(self.model.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise KeyError(f"modules not found in {type(self.model).__name__}: {missing}")
        self._remaining = set(self.names)
        self._unentered = set(self.names)
        pre = self.retain_input or self.edit_input is not None or self.retain_call or self.stop_before
        try:
            for name in self.names:
                mod = modules[name]
                if pre:
                    self._handles.append(mod.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True))
                self._handles.append(mod.register_forward_hook(self._post_hook(name)))
        except BaseException:
            self._remove()
            raise
        return self

    def _pre_hook(self, name: str):
        def hook(_mod, args, kwargs):
            by_kw = not args and kwargs.get(INPUT_KWARG) is not None
            x = args[0] if args else kwargs.get(INPUT_KWARG)
            result = None
            if x is not None and self.edit_input is not None:
                new = self.edit_input(name, x)
                if new is not None:
                    x = new
                    result = (args, {**kwargs, INPUT_KWARG: x}) if by_kw else ((x, *args[1:]), kwargs)
            if x is not None and self.retain_input:
                self.inputs[name] = self._keep(x)
            if self.retain_call:
                rest = {k: v for k, v in kwargs.items() if k != INPUT_KWARG} if by_kw else dict(kwargs)
                self.calls[name] = (tuple(args[1:]), rest)
            if self.stop_before:
                self._unentered.discard(name)
                if not self._unentered:
                    raise StopForward
            return result

        return hook

    def _post_hook(self, name: str):
        def hook(_mod, _args, output):
            result = None
            if self.edit_output is not None:
                new = self.edit_output(name, _first(output))
                if new is not None:
                    result = _replace_first(output, new)
                    output = result
            if self.retain_output:
                self.outputs[name] = self._keep(_first(output))
            if self.stop:
                self._remaining.discard(name)
                if not self._remaining:
                    raise StopForward
            return result

        return hook

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._remove()
        return exc_type is StopForward


class StopForward(Exception):
    """Raised by a ``Trace(stop=True)`` once every traced module has run; swallowed on exit."""
