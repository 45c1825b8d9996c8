"""The one validator of hf_sparse's option dataclasses: types, ranges and choices, declared once per field.

A field declares what it allows next to its help text, in ``dataclasses.field(metadata=...)``; the type comes from
its annotation::

    block_size: int = field(default=128, metadata={"help": "Columns processed together.", "range": "> 0"})
    init: str = field(default="sparsegpt", metadata={"help": "...", "choices": ("sparsegpt", "wanda", "dense")})

Metadata keys read here:

* ``"range"``: ``"[0, 1)"``, ``"(0, 1)"``, ``"[0, 1]"``, ``">= 1"``, ``"> 0"``, ``"> 1"`` (numbers only)
* ``"choices"``: the allowed values
* ``"none_is_default"``: ``None`` stands for a default the owner fills in before validating (``sparsity``), so the
  checked value must not be ``None``
* ``"check"``: ``check(name, value) -> value`` for what a type cannot say (regular expressions, patterns); it runs
  first and may normalise the value (one string -> a list of one)

Types understood: ``bool``, ``int``, ``float``, ``str``, ``list[str]``, ``dict[...]``, ``Any``, and unions of them
with ``None`` (``float | None`` allows ``None``; ``float`` does not). Values are *checked*, never clamped: a bool is not
an int, a string is not a number, NaN is not a float here. Two conversions are made, both lossless: an integer given
for a float field becomes a float, and the spellings ``"true"``/``"false"``/``"1"``/``"0"`` (any case, as a command
line gives them) and the integers 1/0 become booleans.

:func:`validate_dataclass` checks (and normalises) every field of an instance; :func:`validate_mapping` checks a dict
against a dataclass's fields (untrusted JSON such as the sparsity record).

>>> from dataclasses import dataclass, field
>>> @dataclass
... class Options:
...     per_row: bool = field(default=False, metadata={"help": "Rank per row."})
>>> validate_dataclass(Options(per_row="False")) is None
True
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from typing import Any, Union

from .errors import shown

_BOOL_SPELLINGS = {"true": True, "false": False, "1": True, "0": False}
_RANGE = re.compile(r"^\s*(?:([\[(])\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*([\])])|(>=|>)\s*(-?[\d.]+))\s*$")


# ---------------------------------------------------------------------------------------------------------------
# Ranges


@dataclasses.dataclass(frozen=True)
class Range:
    """An interval of allowed numbers, parsed from ``"[0, 1)"`` or ``">= 1"``."""

    low: float | None
    high: float | None
    low_open: bool
    high_open: bool
    text: str

    @classmethod
    @functools.lru_cache(maxsize=None)
    def parse(cls, text: str) -> Range:
        match = _RANGE.match(text)
        if match is None:
            raise ValueError(f"range {shown(text)} is not understood: use '[a, b)', '(a, b]', '>= a' or '> a'")
        left, low, high, right, op, bound = match.groups()
        if op is not None:
            return cls(float(bound), None, op == ">", True, text.strip())
        return cls(float(low), float(high), left == "(", right == ")", text.strip())

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or value < self.high or (not self.high_open and value == self.high)

    def describe(self, integer: bool) -> str:
        """``"a positive integer"`` (``"> 0"``), ``"an integer >= 1"``, ``"in [0, 1)"``, ``"a positive number"``,
        ``"a number > 1"``."""
        if self.high is None:
            if self.low == 0 and self.low_open:  # "> 0" reads "positive"; ">= 1" is kept as written
                return "a positive integer" if integer else "a positive number"
            return f"{'an integer' if integer else 'a number'} {self.text}"
        return f"in {self.text}"


# ---------------------------------------------------------------------------------------------------------------
# Types


def _members(annotation: Any) -> tuple[Any, ...]:
    """The members of a union annotation (``float | None`` -> ``(float, NoneType)``), or the annotation alone."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _type_name(member: Any) -> str:
    origin = typing.get_origin(member) or member
    if origin is list:
        (item,) = typing.get_args(member) or (Any,)
        items = {str: "strings", float: "finite numbers", int: "integers", bool: "booleans"}.get(item)
        return f"a list of {items}" if items else "a list"
    if origin is dict:
        return "a dict"
    return {bool: "True or False", int: "an integer", float: "a number", str: "a string"}.get(origin, str(member))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_member(value: Any, member: Any) -> tuple[bool, Any]:
    """``(True, value)`` (possibly converted) when ``value`` is an instance of the annotation ``member``."""
    origin = typing.get_origin(member) or member
    if member is Any:
        return True, value
    if member is type(None):
        return value is None, value
    if origin is bool:
        if isinstance(value, bool):
            return True, value
        if isinstance(value, str) and value.strip().lower() in _BOOL_SPELLINGS:
            return True, _BOOL_SPELLINGS[value.strip().lower()]
        if isinstance(value, int) and value in (0, 1):
            return True, bool(value)
        return False, value
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if origin is float:
        if _is_number(value) and math.isfinite(value):
            return True, float(value) + 0.0  # -0.0 -> 0.0: a record never says "-0.0"
        return False, value
    if origin is str:
        return isinstance(value, str), value
    if origin is list:
        (item,) = typing.get_args(member) or (Any,)
        if isinstance(value, (list, tuple)) and all(_as_member(v, item)[0] for v in value):
            return True, list(value)
        return False, value
    if origin is dict:
        return isinstance(value, dict), value
    return isinstance(value, origin), value


def describe(annotation: Any, metadata: typing.Mapping[str, Any]) -> str:
    """What a field allows, in words: ``"a positive integer or None"``, ``"a number in [0, 1)"``."""
    members = [m for m in _members(annotation) if m is not type(None)]
    optional = len(members) < len(_members(annotation))
    if "choices" in metadata:
        text = f"one of {tuple(metadata['choices'])}"
    elif "range" in metadata:
        integer = all((typing.get_origin(m) or m) is int for m in members)
        text = Range.parse(metadata["range"]).describe(integer)
        if text.startswith("in ") and not integer:
            text = "a number " + text
        elif text.startswith("in "):
            text = "an integer " + text
    else:
        text = " or ".join(_type_name(m) for m in members)
    return f"{text} or None" if optional else text


def check_value(name: str, value: Any, annotation: Any, metadata: typing.Mapping[str, Any]) -> Any:
    """``value`` checked against a field's annotation and metadata (and converted as the module doc says).

    Raises a one-line ``ValueError`` naming the field, the value (with its type when the type is wrong) and what
    is allowed.

    >>> check_value("sparsity", 1.5, float, {"range": "[0, 1)"})
    Traceback (most recent call last):
    ...
    ValueError: sparsity must be in [0, 1), got 1.5
    """
    if "check" in metadata:
        value = metadata["check"](name, value)
    if metadata.get("none_is_default"):
        annotation = Union[tuple(m for m in _members(annotation) if m is not type(None))]
    for member in _members(annotation):
        matches, converted = _as_member(value, member)
        if matches:
            break
    else:
        if isinstance(value, (list, tuple)):  # name the first item that does not fit, not the whole list
            for member in _members(annotation):
                if (typing.get_origin(member) or member) is list:
                    (item,) = typing.get_args(member) or (Any,)
                    for index, entry in enumerate(value):
                        if not _as_member(entry, item)[0]:
                            wanted = "a finite number" if item is float else _type_name(item)
                            raise ValueError(f"{name}[{index}] must be {wanted}, got {shown(entry)} "
                                             f"({type(entry).__name__}); {name} must be "
                                             f"{describe(annotation, metadata)}")
        raise ValueError(f"{name} must be {describe(annotation, metadata)}, got {shown(value)} ({type(value).__name__})")
    if converted is None:
        return None
    if "choices" in metadata and converted not in metadata["choices"]:
        raise ValueError(f"{name} must be one of {tuple(metadata['choices'])}, got {shown(converted)}")
    if "range" in metadata and _is_number(converted) and converted not in Range.parse(metadata["range"]):
        wording = describe(annotation, metadata)
        # "must be in [0, 1)" for a number of the right type, as every message of hf_sparse has said.
        wording = wording.replace("a number in ", "in ", 1)
        raise ValueError(f"{name} must be {wording}, got {shown(value)}")
    return converted


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _prefixed(prefix: str, name: str) -> str:
    return f"{prefix} {name}" if prefix and not prefix.endswith(".") else f"{prefix}{name}"


def validate_dataclass(instance: Any, prefix: str = "") -> None:
    """Check every field of a dataclass instance (``init`` fields only) and store the converted values.

    ``prefix`` starts every message (``"fista"`` gives ``"fista xi must be in (0, 1), got 1.5"``).
    """
    hints = _hints(type(instance))
    for f in dataclasses.fields(instance):
        if not f.init:
            continue
        value = check_value(_prefixed(prefix, f.name), getattr(instance, f.name), hints[f.name], f.metadata)
        object.__setattr__(instance, f.name, value)


def validate_mapping(data: Any, cls: type, prefix: str, *, allow_unknown: bool = False) -> dict[str, Any]:
    """Check a dict (untrusted JSON) against the fields of dataclass ``cls``; returns the converted values.

    Missing keys take the field's default; a missing key without a default, an unknown key (unless
    ``allow_unknown``) or a bad value raise ``ValueError`` naming ``prefix + key``.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.')} must be an object, got {shown(data)} ({type(data).__name__})")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown and not allow_unknown:
        raise ValueError(f"{prefix.rstrip('.')} has unknown key(s) {unknown}; allowed: {sorted(fields)}")
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = check_value(_prefixed(prefix, name), data[name], hints[name], f.metadata)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"{prefix}{name} is missing")
    return values


def to_json_dict(instance: Any, *, omit_none: typing.Iterable[str] = ()) -> dict[str, Any]:
    """The ``init`` fields of a dataclass as a plain dict (containers copied); fields in ``omit_none`` are left out
    when ``None``, so optional keys appear only when set."""
    omit = set(omit_none)
    out = {}
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if not f.init or (f.name in omit and value is None):
            continue
        out[f.name] = dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else value
    return out


# ---------------------------------------------------------------------------------------------------------------
# Checks for what a type cannot say


def regex_list(name: str, value: Any) -> list[str] | None:
    """A list of valid regular expressions (one string is a list of one).

    >>> regex_list("include", r"mlp\\.")
    ['mlp\\\\.']
    """
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a list of regular expressions on module names, got {shown(value)}")
    if not value:
        raise ValueError(f"{name}=[] lists no regular expression; leave {name} unset (None) for its default")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"{name} entry {shown(pattern)} is not a valid regular expression: {error}") from None
    return list(value)


def positive_int(name: str, value: Any) -> int:
    """``value`` if it is an integer >= 1 (not a bool), else the standard one-line error.

    >>> positive_int("--num-samples", 0)
    Traceback (most recent call last):
    ...
    ValueError: --num-samples must be a positive integer, got 0
    """
    return check_value(name, value, int, {"range": "> 0"})


__all__ = ["Range", "check_value", "describe", "positive_int", "regex_list", "to_json_dict", "validate_dataclass",
           "validate_mapping"]
