"""argparse options generated from a stage's config dataclass (``pipeline.options`` declarations).

Each field is declared once (type, default, help, choices, range, flag, parse); from that
declaration come the job's ``--help``, its parsing and range checks, the YAML config's
validation (jobs/config.py maps a file onto these same options, so a wrong type, choice or
range names the file and the field), and ``lcam pipeline``'s prefixed stage flags.

Reading the declarations imports only the torch-free ``pipeline.configs``: ``lcam <cmd> --help``
stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable

from pipeline.errors import UserError
from pipeline.options import MISSING, UNSET, Option, check_range, comma_list, option_of, parse_storage_options, validate

__all__ = [
    "add_option",
    "add_options",
    "check_ranges",
    "comma_list",
    "config_from_args",
    "field_value",
    "option_dest",
    "parse_storage_options",
]


def _base_type(field: dataclasses.Field) -> Callable[[Any], Any]:
    """int, float or str from the field's annotation (``int | None`` -> int; anything else: text)."""
    annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    kinds = [t.strip() for t in annotation.split("|") if t.strip() != "None"]
    return {"int": int, "float": float}.get(kinds[0], str) if len(kinds) == 1 else str


def _number(base: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """An argparse type for a number that reads the command line's text and a YAML config's
    values alike: no booleans, no fractions for an int. (The declared range is checked after
    parsing, as one line naming the flag or the config field: argparse would add its usage.)"""

    def convert(value: Any) -> Any:
        if isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}")
        if base is int and isinstance(value, float) and not value.is_integer():
            raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}")
        try:
            return base(value)
        except (TypeError, ValueError):
            kind = "whole number" if base is int else "number"
            raise argparse.ArgumentTypeError(f"expected a {kind}, got {value!r}") from None

    convert.__name__ = base.__name__
    return convert


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def option_dest(name: str, option: Option, prefix: str = "") -> str:
    """The argparse dest (and the YAML key) of a field's option."""
    if option.positional:
        return prefix.replace("-", "_") + name
    if option.dest:
        return prefix.replace("-", "_") + option.dest
    return option.flag_for(name, prefix)[2:].replace("-", "_")


FLAG_SUFFIX = "__flag"  # the dest of a positional's flag spelling (OUT and --out)


def _field(config: type, name: str) -> dataclasses.Field:
    fields = {f.name: f for f in dataclasses.fields(config)}
    if name not in fields:
        raise KeyError(f"{config.__name__} has no field {name!r}")
    return fields[name]


def add_option(
    parser: Any, config: type, name: str, *, prefix: str = "", flag: str | None = None, **override: Any
) -> argparse.Action:
    """One field's option on ``parser`` (or an argument group). ``prefix``: ``img-`` makes
    ``--augment`` ``--img-augment``; ``flag`` names it outright; ``override`` replaces parts
    of the declaration (``default``, ``help``, ``choices``) where a job means something else."""
    field = _field(config, name)
    declared = option_of(field)
    default = override.pop("default", MISSING)
    changes = {k: v for k, v in override.items() if k in {f.name for f in dataclasses.fields(Option)}}
    unknown = set(override) - set(changes)
    if unknown:
        raise TypeError(f"add_option: unknown override(s) {sorted(unknown)}")
    o = dataclasses.replace(declared, **changes)
    if o.derived:
        raise ValueError(f"{config.__name__}.{name} has no option: {o.derived}")
    if default is MISSING:
        default = (
            o.cli_default
            if o.cli_default is not UNSET
            else (
                field.default
                if field.default is not MISSING
                else (field.default_factory() if field.default_factory is not MISSING else MISSING)
            )
        )
    option_flag = flag or o.flag_for(name, prefix)
    dest = option_dest(name, o, prefix) if flag is None else flag[2:].replace("-", "_")
    kwargs: dict[str, Any] = {"help": o.help or None}
    if o.kind in ("switch", "negated"):
        store_false = o.kind == "negated" and dest == name  # --no-fold-batchnorm: the field itself, off
        kwargs.update(action="store_false" if store_false else "store_true")
    elif o.kind in ("list", "storage"):
        kwargs.update(action="append", default=None, metavar=o.metavar)
    else:
        base = o.type or _base_type(field)
        kwargs.update(
            type=_number(base) if base in (int, float) else (None if base is str else base),
            default=None if default is MISSING else default,
            choices=o.choices,
            metavar=o.metavar,
        )
        if (
            default not in (MISSING, None)
            and (o.parse is not None or isinstance(default, (tuple, list)))
            and o.help
            and "default" not in o.help
        ):
            kwargs["help"] = f"{o.help} (default {_show(default)})"  # the text form, not a tuple's repr
    if o.positional:
        if o.aliases:  # OUT or --out: the same value either way (one word for the output everywhere)
            kwargs.update(nargs="?", default=None if default is MISSING else default)
        else:
            kwargs.pop("default", None) if default is MISSING else kwargs.update(nargs="?")
        kwargs.pop("metavar", None)
        action = parser.add_argument(dest, **kwargs)
        if o.aliases:
            alias = parser.add_argument(
                *o.aliases,
                dest=dest + FLAG_SUFFIX,
                default=None,
                metavar=dest.upper(),
                help=f"the same as {dest.upper()}",
            )
            alias.option = o
            action.required_field = default in (MISSING, None)  # a YAML config must give it (jobs/config.py)
    else:
        if o.required:
            kwargs.update(required=True, default=None)
        action = parser.add_argument(option_flag, *o.aliases, dest=dest, **kwargs)
    action.option = o  # jobs/config.py checks a YAML value against the declared range
    return action


def add_options(parser: argparse.ArgumentParser, config: type, *, prefix: str = "") -> None:
    """Every declared option of ``config``, in field order (derived fields have none); options
    that declare a ``group`` go under that heading of ``--help``."""
    groups: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        o = option_of(field)
        if o.derived:
            continue
        if o.group and o.group not in groups:
            groups[o.group] = parser.add_argument_group(o.group)
        add_option(groups[o.group] if o.group else parser, config, field.name, prefix=prefix)


def field_value(config: type, name: str, args: argparse.Namespace, prefix: str = "") -> Any:
    """The field's value from the parsed ``args`` (negation and ``parse`` applied)."""
    o = option_of(_field(config, name))
    dest = option_dest(name, o, prefix)
    value = getattr(args, dest)
    if o.positional and o.aliases:
        flagged = getattr(args, dest + FLAG_SUFFIX, None)
        if flagged is not None and value is not None and flagged != value and value != _field(config, name).default:
            raise UserError(f"{dest.upper()} was given twice ({value} and {o.aliases[0]} {flagged}); give it once")
        value = flagged if flagged is not None else value
    if o.kind == "negated" and dest != name:
        value = not value
    elif o.kind == "storage":
        value = parse_storage_options(value)
    if o.kind == "list":
        value = list(value or [])  # a repeatable flag given no time: an empty list, which parse may map
    if o.parse is not None and value is not None and o.kind not in ("negated", "storage"):
        try:
            value = o.parse(value)
        except (TypeError, ValueError) as exc:
            raise UserError(f"{o.flag_for(name, prefix)}: {exc}") from None
    check_range(value, o, o.flag_for(name, prefix))  # a parse result, or a YAML value, gets the range too
    return value


def config_from_args(config: type, args: argparse.Namespace, *, prefix: str = "", **given: Any) -> Any:
    """``config(...)`` from parsed arguments: every field that has an option takes its value;
    ``given`` supplies the rest (derived fields, values the job computes); fields neither
    given nor optioned keep their dataclass default."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.name in given:
            values[f.name] = given[f.name]
        elif not option_of(f).derived:
            values[f.name] = field_value(config, f.name, args, prefix)
    return validate(config(**values))  # declared choices and ranges, then the config's own check(): before torch or Ray


def check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every generated option's value against its declared range: one line naming the flag
    (``lcam pipeline --extract-batch-size 0`` is refused before any stage runs)."""
    for action in parser._actions:
        declared = getattr(action, "option", None)
        if declared is not None and action.option_strings:
            check_range(getattr(args, action.dest, None), declared, action.option_strings[0])
