"""Each config field's option, declared once beside the field (``dataclasses.field`` metadata).

A stage's config dataclass says, per field, what its command-line option is: help, choices,
range, the flag when it is not ``--field-name``, and how the command-line text becomes the
field's value. ``jobs/options.py`` builds the argparse options (and so the YAML validation,
``lcam submit``'s check and ``lcam pipeline``'s prefixed flags) from these declarations.

Torch-free, and free of argparse: the pipeline layer only describes; the job layer parses.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .errors import UserError, option_flag

MISSING: Any = dataclasses.MISSING


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()  # an Option's cli_default when the field's own default serves
OPTION_KEY = "option"  # the metadata key holding a field's Option

# one meaning of --precision auto everywhere (pipeline/device.py)
PRECISION_HELP = "auto: bf16 autocast on a GPU (fp16 on a GPU without bf16), fp32 on a CPU"
LAYER_HELP = "split the backbone after this layer (a named_modules name, as Grad-CAM target layers); the same as the spec option ,layer=NAME"
BACKBONE_HELP = (
    "a built-in name (efficientnet_lite0, vgg16, resnet50, ...), timm:<model>, torchvision:<builder> or "
    "module.path:factory; options ,layer=NAME ,size=N"
)
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Option:
    """How one config field is given on the command line (and in a YAML config).

    ``kind``: ``value`` (one value; its type from the field's annotation or ``type``),
    ``switch`` (a flag that sets True; ``negated``: a flag that sets the field to False,
    e.g. ``--no-progress`` for ``progress``), ``list`` (repeatable flag, the values as a list),
    ``storage`` (repeatable ``--...-storage-option key=value``, parsed into a mapping).
    ``parse``: the command-line value -> the field's value (comma lists, name maps); the CLI's
    default is then ``cli_default`` (its text form). ``derived``: not an option; says why
    (the job computes the field from other options, or it is an internal knob).
    """

    help: str = ""
    kind: str = "value"
    flag: str | None = None  # default: --field-name
    aliases: tuple[str, ...] = ()  # further flags with the same meaning (--quiet for --no-progress)
    dest: str | None = None  # the argparse dest (a YAML key) when not the flag's name
    positional: bool = False
    required: bool = False  # a flag that must be given (lcam audit --out)
    type: Callable[[Any], Any] | None = None  # default: from the annotation (int, float, str)
    choices: tuple[Any, ...] | None = None
    min: float | None = None  # inclusive range of a number
    max: float | None = None
    range_text: str | None = (
        None  # the range in words, when "at least MIN" says it badly ("a positive number of images")
    )
    parse: Callable[[Any], Any] | None = None
    cli_default: Any = UNSET
    metavar: str | None = None
    group: str | None = None  # a heading in --help
    derived: str | None = None

    def flag_for(self, field: str, prefix: str = "") -> str:
        name = (self.flag or "--" + field.replace("_", "-"))[2:]
        return f"--{prefix}{name}"


def opt(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, **option: Any) -> Any:
    """A dataclass field with its option: ``batch_size: int = opt(32, "images per forward", min=1)``."""
    meta = {OPTION_KEY: Option(help=help, **option)}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def derived(default: Any = MISSING, why: str = "", *, default_factory: Any = MISSING) -> Any:
    """A field with no option of its own: ``why`` says where its value comes from."""
    return opt(default, default_factory=default_factory, derived=why)


def storage(what: str, flag: str) -> Any:
    """A storage options field (default None), given as repeatable ``flag key=value``."""
    return opt(
        None,
        f"fsspec storage option{what} (repeatable; dots nest: client_kwargs.endpoint_url=http://...)",
        kind="storage",
        flag=flag,
        metavar="KEY=VALUE",
    )


def option_of(field: dataclasses.Field) -> Option:
    """The field's declared option (a plain field: a value option with no help)."""
    return field.metadata.get(OPTION_KEY) or Option()


def options(config: type) -> dict[str, Option]:
    """Field name -> Option, in field order, for a config dataclass."""
    return {f.name: option_of(f) for f in dataclasses.fields(config)}


def flag_names(config: type) -> dict[str, str]:
    """Field -> flag for the fields whose flag is not ``--field-name`` (for :func:`pipeline.errors.flag_namer`)."""
    out = {}
    for name, o in options(config).items():
        if not o.derived and not o.positional and o.flag_for(name) != "--" + name.replace("_", "-"):
            out[name] = o.flag_for(name)
    return out


def comma_list(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"center, hflip"`` -> ``("center", "hflip")`` (empty items dropped; a sequence passes through)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return tuple(str(v).strip() for v in items if str(v).strip())


def parse_storage_options(pairs: list[str] | None) -> dict[str, Any] | None:
    """``--storage-option key=value`` (repeatable; values parsed as JSON when they parse).

    Credentials belong in the environment or the cloud role, not here: these options
    are never written to caches, checkpoints or logs.
    """
    if not pairs:
        return None
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        parts = key.split(".")
        if not sep or not key or not all(p.strip() for p in parts):
            raise UserError(
                f"storage option {pair!r} must look like key=value (dots nest: client_kwargs.endpoint_url=http://...)"
            )
        try:
            parsed: Any = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        cursor = out
        *parents, leaf = parts  # client_kwargs.endpoint_url=... nests
        for p in parents:
            cursor = cursor.setdefault(p, {})
            if not isinstance(cursor, dict):
                raise UserError(
                    f"storage option {pair!r}: {p!r} was already given a value, it cannot also hold {leaf!r}"
                )
        cursor[leaf] = parsed
    return out


def range_problem(value: Any, option: Option) -> str | None:
    """What is wrong with ``value`` against the option's declared range ("must be at least 1, got 0"), or None."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    low, high = option.min, option.max
    if (low is not None and value < low) or (high is not None and value > high):
        if option.range_text:
            words = option.range_text
        elif low is not None and high is not None:
            words = f"between {low:g} and {high:g}"
        else:
            words = f"at least {low:g}" if low is not None else f"at most {high:g}"
        return f"must be {words}, got {value:g}" if isinstance(value, float) else f"must be {words}, got {value}"
    return None


def check_range(value: Any, option: Option, flag: str) -> None:
    """UserError naming ``flag`` when ``value`` lies outside the option's declared range."""
    problem = range_problem(value, option)
    if problem:
        raise UserError(f"{flag} {problem}")


def spoken(flag: Callable[[str], str], field: str, option: Option) -> str:
    """The field's flag as the command that runs the stage spells it (its own flag: the declared one)."""
    return option.flag_for(field) if flag is option_flag else flag(field)


def validate(config: Any) -> Any:
    """Every field of a config dataclass against its declared choices and range, then the
    config's own ``check()`` (rules between fields, torch-free): the one check of a config's
    values, run by the job layer before any stage imports torch or starts Ray (so any
    refusal answers in well under a second), and again by the stage for configs made in
    Python. The first problem is one :class:`UserError` naming the flag; returns ``config``."""
    for f in dataclasses.fields(config):
        o = option_of(f)
        value = getattr(config, f.name)
        if o.derived or value is None:
            continue
        if o.choices:
            items = list(value) if isinstance(value, (list, tuple)) else [value] if o.parse is None else []
            for item in items:
                if item not in o.choices:
                    raise UserError(
                        lambda flag, f=f, item=item, o=o: (
                            f"{spoken(flag, f.name, o)}: {item!r} is not one of {', '.join(map(str, o.choices))}"
                        )
                    )
        problem = range_problem(value, o)
        if problem:
            raise UserError(lambda flag, f=f, o=o, problem=problem: f"{spoken(flag, f.name, o)} {problem}")
    check = getattr(config, "check", None)
    if callable(check):
        check()
    return config
