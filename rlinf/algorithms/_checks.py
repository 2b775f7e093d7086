"""Argument checks shared by the algorithm functions; each error names the value, the rule and a fix.

Only shapes and Python scalars are checked: anything that would read tensor data (and so force a
device sync) is left to the caller.
"""

from __future__ import annotations

import difflib
import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor


def tensor(name: str, value: object) -> Tensor:
    """Returns ``value`` if it is a tensor, else raises ``TypeError`` naming it."""
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor, got {type(value).__name__}; wrap it with torch.as_tensor(...)."
        )
    return value


def floating(name: str, value: object) -> Tensor:
    """Returns ``value`` as a floating tensor (bool and integer tensors become float32)."""
    t = tensor(name, value)
    return t if t.is_floating_point() else t.to(torch.float32)


def as_mask(name: str, value: object, like: Tensor, like_name: str) -> Tensor:
    """Returns ``value`` as a bool mask, checking that it has the shape of ``like``."""
    m = tensor(name, value)
    same_shape((like_name, like), (name, m))
    return m if m.dtype == torch.bool else m != 0


def optional_mask(name: str, value: object, like: Tensor, like_name: str) -> Tensor | None:
    """``as_mask``, or ``None`` (every element valid) when ``value`` is ``None``."""
    return None if value is None else as_mask(name, value, like, like_name)


def same_shape(*named: tuple[str, Tensor]) -> None:
    """Raises ``ValueError`` unless all the named tensors have the shape of the first."""
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {first_name} has shape {tuple(first.shape)}; "
                "they must match element for element. Cut or pad both to the same layout "
                "(e.g. the response tokens [B, T])."
            )


def ndim(name: str, t: Tensor, expected: int, layout: str, fix: str = "") -> None:
    """Raises ``ValueError`` unless ``t`` has ``expected`` dimensions."""
    if t.dim() != expected:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)} ({t.dim()} dims) but must be {expected}-D {layout}; "
            f"{fix or 'reshape it to ' + layout}."
        )


def positive_int(name: str, value: int, minimum: int = 1) -> int:
    """Returns ``value`` as an int, raising ``ValueError`` if it is not an integer >= ``minimum``."""
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}, not a bool.")
    try:
        n = operator.index(value)
    except TypeError:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}; pass an int.") from None
    if n < minimum:
        raise ValueError(f"{name}={n} must be >= {minimum}.")
    return n


def in_range(name: str, value: float, low: float, high: float, fix: str = "") -> float:
    """Returns ``value`` as a float, raising ``ValueError`` unless ``low <= value <= high``."""
    v = float(value)
    if math.isnan(v) or not low <= v <= high:
        raise ValueError(f"{name}={value!r} must lie in [{low}, {high}].{' ' + fix if fix else ''}")
    return v


def choice(name: str, value: str, options: Sequence[str]) -> str:
    """Returns ``value`` if it is one of ``options``, else raises ``ValueError`` with a suggestion."""
    if value in options:
        return value
    close = difflib.get_close_matches(str(value), list(options), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, options))}.{hint}")
