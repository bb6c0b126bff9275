"""A component factory's parameters: names, defaults, declared types, ranges and help, and values checked
against them.

A plugin author declares a parameter where it is written, as a config key is declared on its field:
``temperature: Annotated[float, Range(0, 10, low_open=True), "softmax temperature"] = 1.0`` (the type,
then a ``Range`` for a number and/or a help string, in any order); ``Literal[...]`` declares choices.
``pqa run``'s pre-flight, ``print_config``, ``pqa plugins check`` and the build itself check a value
through ``check_values``, and ``pqa plugins --verbose`` prints the help.

A config value reaches a factory as Sacred parsed it (``rank=abc`` is the string ``'abc'``,
``rank=2.5`` a float). Checking it before anything is built turns a late ``TypeError`` deep inside a
run into one line naming the component and the parameter. Types understood: ``int``, ``float`` (an
int is accepted), ``bool`` (only true/false, not 0/1), ``str``, ``Literal[...]``, ``Optional``/``Union``
of those, ``list``/``tuple``; anything else is not checked. An unannotated parameter takes the type
of its default, when that is one of those.
"""
from __future__ import annotations

import inspect
import math
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from pqa_core.errors import UsageError

_NOT_CHECKED = object()


@dataclass(frozen=True)
class Range:
    """The numbers a setting allows: ``low``..``high`` (None: unbounded), ``low`` itself excluded with
    ``low_open``, ``high`` with ``high_open``. Floats must also be finite. A config key declares one
    in its field's metadata; a plugin parameter in its annotation: ``Annotated[float, Range(0, 10), "help"]``."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def allows(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.high_open and value == self.high))

    def describe(self, kind: str) -> str:
        """``an integer >= 1``, ``a finite number > 0``, ``a finite number in [0, 1)``."""
        what = "an integer" if kind == "int" else "a finite number"
        if self.low is not None and self.high is not None:
            return (f"{what} in {'(' if self.low_open else '['}{_num(self.low)}, "
                    f"{_num(self.high)}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{what} {'<' if self.high_open else '<='} {_num(self.high)}"
        return what


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def accepted_parameters(factory: Callable[..., Any]) -> Dict[str, inspect.Parameter]:
    """The keyword parameters a factory takes (``*args``/``**kwargs`` excluded)."""
    params = inspect.signature(factory).parameters
    return {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


@dataclass(frozen=True)
class Declared:
    """What an ``Annotated`` parameter declares besides its type."""

    range: Optional[Range] = None
    help: Optional[str] = None


def declarations(factory: Callable[..., Any]) -> Dict[str, Declared]:
    """Each parameter's declared range and help (``Annotated[type, Range(...), "help"]``)."""
    found = {}
    for name, annotation in _annotations(factory, extras=True).items():
        if typing.get_origin(annotation) is typing.Annotated:
            extras = annotation.__metadata__
            found[name] = Declared(next((e for e in extras if isinstance(e, Range)), None),
                                   next((e for e in extras if isinstance(e, str)), None))
    return found


def parameter_types(factory: Callable[..., Any]) -> Dict[str, Any]:
    """Each parameter's type, resolved (string annotations evaluated in the factory's module; an
    ``Annotated`` one is its first argument); one that cannot be resolved is left out."""
    return {name: _strip(annotation) for name, annotation in _annotations(factory).items()}


def _strip(annotation: Any) -> Any:
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Annotated else annotation


def _annotations(factory: Callable[..., Any], extras: bool = False) -> Dict[str, Any]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        return typing.get_type_hints(target, include_extras=extras)
    except Exception:  # an unresolvable forward reference: resolve what can be resolved
        pass
    module = sys.modules.get(getattr(target, "__module__", ""), None)
    namespace = dict(vars(typing), **(vars(module) if module else {}))
    found = {}
    for name, annotation in getattr(target, "__annotations__", {}).items():
        try:
            found[name] = eval(annotation, namespace) if isinstance(annotation, str) else annotation  # noqa: S307
        except Exception:
            continue
    return found


def type_name(annotation: Any) -> str:
    """``int``, ``Optional[float]``, ``Literal['a', 'b']`` ... as a user reads them."""
    if annotation is inspect.Parameter.empty:
        return "any"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _matches(value: Any, annotation: Any) -> Any:
    """True/False, or ``_NOT_CHECKED`` for an annotation this module does not understand."""
    origin = typing.get_origin(annotation)
    if annotation is Any or annotation is inspect.Parameter.empty:
        return _NOT_CHECKED
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin is typing.Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        results = [_matches(value, arg) for arg in typing.get_args(annotation)]
        if any(r is True for r in results):
            return True
        return _NOT_CHECKED if any(r is _NOT_CHECKED for r in results) else False
    if annotation in (list, tuple) or origin in (list, tuple, typing.Sequence):
        return isinstance(value, (list, tuple))
    return _NOT_CHECKED


def check_value(what: str, key: str, value: Any, annotation: Any) -> None:
    """``UsageError`` when ``value`` does not fit ``annotation``; ``what`` names the component."""
    if _matches(value, annotation) is False:
        raise UsageError(f"{what}: parameter {key!r} must be {type_name(annotation)}, "
                         f"got {value!r} ({type(value).__name__})")


def expected_types(factory: Callable[..., Any]) -> Dict[str, Any]:
    """What each parameter takes: its annotation, else the type of a ``bool``/``int``/``float``/``str``
    default (``rank=1`` takes an int), else nothing is known."""
    types = parameter_types(factory)
    for name, param in accepted_parameters(factory).items():
        if name not in types and type(param.default) in (bool, int, float, str):
            types[name] = type(param.default)
    return types


def check_values(what: str, factory: Callable[..., Any], kwargs: Dict[str, Any]) -> None:
    """Check every user value against what its parameter takes (``expected_types``), then a number
    against its declared ``Range``."""
    types, declared = expected_types(factory), declarations(factory)
    for key, value in kwargs.items():
        if key in types:
            check_value(what, key, value, types[key])
        allowed = declared[key].range if key in declared else None
        if allowed is not None and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and not allowed.allows(value):
            kind = "int" if types.get(key) is int else "float"
            raise UsageError(f"{what}: parameter {key!r} = {value!r}: must be {allowed.describe(kind)}")


def first_doc_line(obj: Any) -> Optional[str]:
    """The first line of ``obj``'s own docstring (not one inherited from its interface)."""
    doc = inspect.cleandoc(obj.__doc__ or "")
    return doc.splitlines()[0] if doc else None
