"""The CAM-method base class, its options and the registry (no torch import here).

A method is one short subclass of :class:`CAMMethod` in its own module of this package,
decorated with :func:`register`, declaring by keywords on its class statement its ``name``
(what ``--methods`` takes), ``label`` (the table's row), ``cost`` (a cost class, see
:data:`COST_CLASSES`), ``default`` and ``rank``; and its ``options`` (each
becomes a ``lcam eval`` flag and an ``EvalConfig.method_options`` entry). Evaluation,
the CLI, ``lcam pipeline`` and the report read their lists from the registry, so adding
a method is adding one module. This module and the method modules import torch only
inside functions: ``lcam eval --help`` lists the methods without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

if TYPE_CHECKING:
    import torch

    from ..backbones.base import Backbone

# What one map costs, per image; the report and ``--help`` show it.
COST_CLASSES = {
    "free": "no forward pass (a map that does not look at the image)",
    "forward": "one forward pass",
    "backward": "one forward and one backward pass through the head",
    "channels": "one forward per feature channel (C = 512 VGG-16, 2048 ResNet-50, 1280 EfficientNet-Lite0)",
    "masks": "one forward per random mask (thousands)",
}


def int_list(text: str | int | Sequence[int]) -> tuple[int, ...]:
    """``"10,50,90"`` (or a sequence, or one int) -> (10, 50, 90): the type of list-valued options."""
    if isinstance(text, int):
        return (text,)
    if isinstance(text, str):
        try:
            return tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    return tuple(int(v) for v in text)


@dataclass(frozen=True)
class Option:
    """One knob of a method or metric: ``--{flag}`` on the command line, ``name`` in code."""

    name: str  # the keyword argument of the method's constructor
    type: Callable[[Any], Any]
    default: Any
    help: str = ""
    flag: str | None = None  # the CLI flag without dashes (default: "<owner>-<name>")

    def cli_flag(self, owner: str) -> str:
        return self.flag or f"{owner}-{self.name}".replace("_", "-").replace("+", "p")


class CAMMethod:
    """Base class: built with a backbone and option values, called as
    ``method(images, class_ids) -> (B, h, w)`` maps.

    ``images`` (B, 3, H, W) in pixel space [0, 1], one class id per image; maps at the
    method's own resolution, not necessarily normalised (the evaluation min-max
    normalises and upsamples every map the same way). Subclasses set the class
    attributes and implement :meth:`compute`; :meth:`setup` runs after the options are
    set (e.g. RISE draws its masks there).
    """

    name: ClassVar[str] = "cam"
    label: ClassVar[str] = "CAM"
    cost: ClassVar[str] = "forward"
    options: ClassVar[tuple[Option, ...]] = ()
    default: ClassVar[bool] = False  # in the default list of ``lcam eval --methods``
    rank: ClassVar[int] = 50  # table order: explainers, baselines, then sanity floors
    reseed_per_batch: ClassVar[bool] = False  # the evaluator calls reseed(seed of the batch)

    def __init_subclass__(
        cls,
        *,
        name: str | None = None,
        label: str | None = None,
        cost: str | None = None,
        default: bool | None = None,
        rank: int | None = None,
        **kwargs: Any,
    ) -> None:
        """A method declares itself by keywords on its class statement:
        ``class GradCAM(CAMMethod, name="gradcam", label="Grad-CAM", cost="backward", default=True, rank=10)``;
        what it leaves out it inherits."""
        super().__init_subclass__(**kwargs)
        for key, value in (("name", name), ("label", label), ("cost", cost), ("default", default), ("rank", rank)):
            if value is not None:
                setattr(cls, key, value)

    def __init__(self, backbone: Backbone, **options: Any) -> None:
        known = {o.name: o for o in self.options}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(
                f"{self.name}: unknown option(s) {', '.join(unknown)}; options: {', '.join(known) or 'none'}"
            )
        self.backbone = backbone
        self.option_values = {n: (o.type(options[n]) if n in options else o.default) for n, o in known.items()}
        for n, v in self.option_values.items():
            setattr(self, n, v)
        self.setup()

    def setup(self) -> None:
        """Called once the options are attributes."""

    def __call__(self, images: torch.Tensor, class_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Maps (B, h, w) for ``images`` (B, 3, H, W) in [0, 1] and ``class_ids`` (B,)."""
        import torch

        from ..attention import check_targets

        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        ids = check_targets(torch.as_tensor(class_ids).cpu(), images.shape[0], self.backbone.num_classes)
        return self.compute(images, ids.to(images.device))

    def compute(self, images: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forwards_per_image(self, channels: int) -> int | None:
        """Full backbone forwards one map costs (``channels``: C of the feature maps), for
        progress with an ETA while a costly method runs; None: not worth reporting."""
        return None

    def reseed(self, seed: int) -> None:
        """Restart the method's random sequence (only methods with ``reseed_per_batch``)."""

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.option_values.items()) if hasattr(self, "option_values") else ""
        return f"{type(self).__name__}(backbone={self.backbone.name!r}{opts})"


_REGISTRY: dict[str, type[CAMMethod]] = {}


def register(cls: type[CAMMethod]) -> type[CAMMethod]:
    """Class decorator: add a method to the registry; a name or flag taken twice is an error."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(
            f"a CAM method named {cls.name!r} is already registered ({_REGISTRY[cls.name].__module__}."
            f"{_REGISTRY[cls.name].__name__}); choose another name for {cls.__module__}.{cls.__name__}"
        )
    if cls.cost not in COST_CLASSES:
        raise ValueError(f"{cls.__name__}: cost {cls.cost!r} is not one of {', '.join(COST_CLASSES)}")
    taken = {o.cli_flag(m.name): m.name for m in _REGISTRY.values() if m is not cls for o in m.options}
    for o in cls.options:
        if o.cli_flag(cls.name) in taken:
            raise ValueError(
                f"{cls.__name__}: option flag --{o.cli_flag(cls.name)} is already used by {taken[o.cli_flag(cls.name)]!r}"
            )
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a method (tests that register a throw-away method clean up with this)."""
    _REGISTRY.pop(name, None)


def method_classes() -> dict[str, type[CAMMethod]]:
    """Every registered method by name, in table order (rank, then name)."""
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (kv[1].rank, kv[0])))


def method_names() -> tuple[str, ...]:
    return tuple(method_classes())


def default_methods() -> tuple[str, ...]:
    """What ``lcam eval`` and ``lcam pipeline`` run next to L-CAM when not told otherwise."""
    return tuple(n for n, c in method_classes().items() if c.default)


def method_class(name: str) -> type[CAMMethod]:
    if name not in _REGISTRY:
        raise KeyError(f"unknown CAM method {name!r}; available: {', '.join(method_names())}")
    return _REGISTRY[name]


def build_method(name: str, backbone: Backbone, **options: Any) -> CAMMethod:
    """``method_class(name)(backbone, **options)`` with a helpful error for unknown names."""
    return method_class(name)(backbone, **options)
