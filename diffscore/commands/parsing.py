"""Command-line options of the function subcommands (everything but fit/validate/test), from their signatures.

A parameter typed by an options dataclass (diffscore.sampling.SamplingOptions, diffscore.lit.predict.Devices, ...)
has its fields at the top level (``--steps``, ``--sampler``, ``--teleport.skip``, ``--devices``), so one definition of
the options serves every command; the other parameters are options of their own, documented by the function's
docstring. The dataclasses check their values when they are built, before the command opens any file.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from typing import Any

from jsonargparse import ArgumentError, ArgumentParser

from diffscore.errors import DiffscoreError


def option_groups(fn: Callable[..., Any]) -> dict[str, type]:
    """{parameter: its dataclass} for the parameters of ``fn`` whose type is an options dataclass."""
    hints = typing.get_type_hints(fn)
    return {
        name: hints[name]
        for name in inspect.signature(fn).parameters
        if isinstance(hints.get(name), type) and dataclasses.is_dataclass(hints[name])
    }


def build_parser(fn: Callable[..., Any], prog: str) -> ArgumentParser:
    """The parser of ``fn``: its own parameters, then the fields of each options dataclass at the top level."""
    groups = option_groups(fn)
    parser = ArgumentParser(prog=prog, exit_on_error=False)
    parser.add_function_arguments(fn, skip=set(groups))
    for cls in groups.values():
        parser.add_class_arguments(cls, nested_key=None)
    return parser


def _make(cls: type, values: dict[str, Any]) -> Any:
    """An options dataclass from its fields' parsed values (nested dataclasses from their sub-dicts)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        value = values.pop(f.name)
        kind = hints[f.name]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = _make(kind, dict(value))
        kwargs[f.name] = value
    return cls(**kwargs)


def parse_error(message: str) -> str:
    """jsonargparse's error in one line: the option, then why each type it could have been refused the value
    (without the "or None" arm)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    head = lines[0] if lines else "invalid arguments"
    if head.startswith('Parser key "') and head.endswith('":'):
        head = "--" + head[len('Parser key "') : -2]
    reasons = [line[2:] for line in lines[1:] if line.startswith("- ") and "NoneType" not in line]
    given = [line for line in lines if line.startswith("Given value:")]
    return "; ".join([head.rstrip(":") + ":" if reasons else head, *reasons, *given[:1]]).replace(":;", ":")


def call(fn: Callable[..., Any], prog: str, argv: list[str]) -> Any:
    """Parse ``argv`` for ``fn`` and call it with its options objects built."""
    parser = build_parser(fn, prog)
    try:
        values = parser.parse_args(argv).as_dict()
    except ArgumentError as e:
        raise DiffscoreError(f"{prog}: {parse_error(str(e))}; see {prog} --help") from None
    values.pop("__path__", None)
    for name, cls in option_groups(fn).items():
        try:
            values[name] = _make(cls, values)
        except TypeError as e:  # a value of the wrong type that the parser let through
            raise DiffscoreError(f"{prog}: {e}") from None
    values.pop("config", None)
    return fn(**values)
