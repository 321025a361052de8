"""YAML job configs mapped onto each job's argparse options, validated field by field.

A config file holds the same fields as the job's command-line options (``batch_size``
or ``batch-size`` for ``--batch-size``; positional arguments by name), and
``key=value`` overrides on the command line win over the file. Storage options may
be given as a nested mapping. Every problem names the file and the field.
"""

from __future__ import annotations

import argparse
from typing import Any, Mapping

import yaml

from pipeline.errors import UserError
from pipeline.options import range_problem

_SKIP = {"help", "config"}


def read_config(path: str) -> dict[str, Any]:
    """A YAML file (local path or fsspec URL), or ``env:NAME`` for YAML text in a variable
    (how ``lcam submit`` hands a config to a job on the cluster)."""
    import os

    from pipeline.fs import get_fs

    if path.startswith("env:"):
        text = os.environ.get(path[4:])
        if text is None:
            raise UserError(f"config variable {path[4:]} is not set")
        return _parse_yaml(text, path)
    try:
        fs, p = get_fs(path)
        text = fs.cat_file(p).decode()
    except FileNotFoundError:
        raise UserError(f"config file {path!r} not found") from None
    return _parse_yaml(text, path)


def _parse_yaml(text: str, path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path}: expected a mapping of fields at the top level, got {type(data).__name__}")
    return data


def parse_overrides(pairs: list[str], where: str = "command line") -> dict[str, Any]:
    """``key=value`` strings (values parsed as YAML scalars: 3 -> int, true -> bool)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"{where}: override {pair!r} must look like key=value")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value) if value != "" else ""
    return out


def _flatten_options(value: Any, prefix: str = "") -> list[str]:
    if isinstance(value, Mapping):
        out: list[str] = []
        for k, v in value.items():
            out += _flatten_options(v, f"{prefix}{k}.")
        return out
    import json

    return [f"{prefix[:-1]}={json.dumps(value) if not isinstance(value, str) else value}"]


def namespace_from_config(
    parser: argparse.ArgumentParser, config: Mapping[str, Any], source: str
) -> argparse.Namespace:
    """Fill ``parser``'s defaults from ``config``; unknown keys, wrong types, missing fields named."""
    actions = {a.dest: a for a in parser._actions if a.dest not in _SKIP and a.dest != argparse.SUPPRESS}
    known = sorted(actions)
    values: dict[str, Any] = {}
    for raw_key, value in config.items():
        key = str(raw_key).replace("-", "_")
        if key not in actions:
            raise UserError(f"{source}: unknown field {raw_key!r}; known fields: {', '.join(known)}")
        action = actions[key]
        values[key] = _convert(action, value, f"{source}: field {raw_key!r}")
    ns = argparse.Namespace()
    for dest, action in actions.items():
        if dest in values:
            setattr(ns, dest, values[dest])
        elif (
            action.required
            or getattr(action, "required_field", False)
            or (not action.option_strings and action.nargs not in ("?", "*"))
        ):
            raise UserError(f"{source}: missing field {dest!r} ({action.help or 'required'})")
        else:
            setattr(ns, dest, action.default)
    return ns


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        if isinstance(value, Mapping):
            return _flatten_options(value)
        items = value if isinstance(value, list) else [value]
        return [_convert_one(action, v, where) for v in items]
    if isinstance(value, (list, dict)) and action.nargs is None:
        raise UserError(f"{where}: expected a single value, got {type(value).__name__}")
    return _convert_one(action, value, where)


def _convert_one(action: argparse.Action, value: Any, where: str) -> Any:
    if value is None:
        return None
    converter = action.type
    try:
        if converter is None:
            if isinstance(value, (dict, list)):
                raise TypeError(f"expected text, got {type(value).__name__}")
            out = value if isinstance(value, str) else str(value)
        elif converter in (int, float) and isinstance(value, bool):
            raise TypeError(f"expected a number, got {value!r}")
        elif converter is int and isinstance(value, float) and not value.is_integer():
            raise TypeError(f"expected a whole number, got {value!r}")
        else:
            out = converter(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        kind = getattr(converter, "__name__", "value")
        raise UserError(f"{where}: {exc if str(exc) else f'invalid {kind} {value!r}'}") from None
    if action.choices is not None and out not in action.choices:
        raise UserError(f"{where}: {out!r} is not one of {', '.join(map(str, action.choices))}")
    declared = getattr(action, "option", None)  # jobs/options.py: the field's declared range
    problem = range_problem(out, declared) if declared is not None else None
    if problem:
        raise UserError(f"{where}: {problem}")
    return out


def split_config_args(argv: list[str]) -> tuple[str | None, list[str], list[str]]:
    """(config path, key=value overrides, remaining argv) from a job's command line."""
    config = None
    overrides: list[str] = []
    rest: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--config":
            config = next(it, None)
            if config is None:
                raise UserError("--config needs a file")
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif "=" in arg and not arg.startswith("-") and config is not None:
            overrides.append(arg)
        else:
            rest.append(arg)
    return config, overrides, rest


def build_namespace(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Plain argparse, or ``--config FILE [key=value ...]`` mapped onto the same options."""
    config_path, overrides, rest = split_config_args(argv)
    if config_path is None:
        return parser.parse_args(argv)
    if rest:
        raise UserError(f"with --config, give other settings as key=value overrides, not {' '.join(rest)}")
    config = read_config(config_path)
    config.update(parse_overrides(overrides))
    return namespace_from_config(parser, config, config_path)
