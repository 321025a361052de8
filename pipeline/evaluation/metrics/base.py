"""The evaluation-metric plug-in contract and its registry (no torch import here).

A metric is one module of this package holding one :class:`EvalMetric` subclass decorated
with :func:`register_metric`. The evaluator calls :meth:`EvalMetric.compute` for every
method on every batch (timing it and counting its forwards), the aggregation concatenates
its per-image arrays and calls :meth:`EvalMetric.summarize`, and the renderers loop over
the metrics for results.json, results.md, per_image.csv and any chart. Its ``options``
become ``lcam eval`` flags (``--NAME`` switches an optional metric on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Protocol, Sequence

from lcam.cam_methods.base import Option

if TYPE_CHECKING:
    import numpy as np
    import torch


@dataclass
class MetricBatch:
    """What a metric sees of one method on one batch (the images that method scored)."""

    model: Callable[[torch.Tensor], torch.Tensor]  # pixel-space images -> logits (the evaluator's backbone)
    backbone: Any
    images: torch.Tensor  # (m, 3, H, W) in [0, 1]
    cams: torch.Tensor  # (m, h, w), the method's maps at their own resolution
    class_ids: torch.Tensor  # (m,) the clean top-1 classes
    clean_probs: torch.Tensor  # (m, K) softmax of the clean forward
    batch_id: int
    forward_batch: int | None
    # per image (k, 4) boxes x0 y0 x1 y1 on the images' pixel grid (end exclusive, k may be 0);
    # None when the shards carry no boxes (pipeline.images.boxes_in_crop maps them there)
    boxes: Sequence[np.ndarray] | None = None


class MethodOutcome(Protocol):
    """One method's row as a metric's renderers read it
    (:class:`pipeline.evaluation.results.MethodResult` is one)."""

    @property
    def id(self) -> str: ...
    @property
    def label(self) -> str: ...
    @property
    def n(self) -> int: ...
    @property
    def info(self) -> dict[str, Any]: ...
    @property
    def metrics(self) -> dict[str, dict[str, Any]]: ...  # metric name -> its summary


class EvalOutcome(Protocol):
    """What a metric's :meth:`EvalMetric.markdown` and :meth:`EvalMetric.chart` read of the
    aggregated evaluation (:class:`pipeline.evaluation.results.EvalResults` is one). A protocol,
    so that the contract does not import the aggregation, which imports the metrics."""

    @property
    def keys(self) -> list[str]: ...
    @property
    def ranks(self) -> np.ndarray: ...
    @property
    def Y(self) -> np.ndarray: ...
    @property
    def per_method(self) -> dict[str, dict[str, Any]]: ...  # id -> {"rows": image indices, metric name -> its arrays}
    @property
    def methods(self) -> Sequence[MethodOutcome]: ...
    @property
    def metrics(self) -> Sequence[EvalMetric]: ...  # the metrics evaluated, in order


class EvalMetric:
    """One metric: per-batch arrays -> per-method summary -> its part of every output."""

    name: ClassVar[str]
    title: ClassVar[str]
    always: ClassVar[bool] = False  # AD/IC: the protocol's metric, always computed
    needs_boxes: ClassVar[bool] = False  # localisation: on by itself when the shards carry boxes (MetricBatch.boxes)
    help: ClassVar[str] = ""  # the --NAME switch's help
    options: ClassVar[tuple[Option, ...]] = ()
    chart_file: ClassVar[str | None] = None

    def __init__(self, ratios: Sequence[float], **options: Any) -> None:
        known = {o.name: o for o in self.options}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(
                f"metric {self.name}: unknown option(s) {', '.join(unknown)}; options: {', '.join(known) or 'none'}"
            )
        self.ratios = tuple(float(r) for r in ratios)
        self.option_values = {n: (o.type(options[n]) if n in options else o.default) for n, o in known.items()}
        for n, v in self.option_values.items():
            setattr(self, n, v)

    def compute(self, batch: MetricBatch) -> dict[str, np.ndarray]:
        """Per-image arrays for the batch, images on the last axis."""
        raise NotImplementedError

    def summarize(self, Y: np.ndarray, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """One method's JSON-able summary from its per-image arrays (images on the last axis)."""
        raise NotImplementedError

    def protocol(self) -> dict[str, Any]:
        """What the numbers mean: recorded as results.json[name]."""
        return {}

    def markdown(self, res: EvalOutcome) -> list[str]:
        """Lines of results.md (a section with a table)."""
        return []

    def csv_columns(self) -> list[str]:
        return []

    def csv_cells(self, arrays: Mapping[str, np.ndarray], j: int) -> list[str]:
        return []

    def chart(self, res: EvalOutcome) -> bytes | None:
        """A PNG for ``chart_file``."""
        return None


def batch_seed(seed: int, batch_id: int) -> int:
    """A seed for batch ``batch_id`` derived from ``seed``: independent of engine and worker."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(batch_id)]).generate_state(1, np.uint32)[0])


def standard_error(per_image: np.ndarray) -> list[float]:
    """100 x std (ddof 1) / sqrt(N) over the last axis, per row; NaN for fewer than 2 images."""
    import math

    n = per_image.shape[-1]
    return (100.0 * per_image.std(-1, ddof=1) / math.sqrt(n)).tolist() if n > 1 else [float("nan")] * per_image.shape[0]


def fmt(v: float) -> str:
    return "n/a" if v != v else f"{v:.2f}"


_METRICS: dict[str, type[EvalMetric]] = {}


def register_metric(cls: type[EvalMetric]) -> type[EvalMetric]:
    """Class decorator; a name taken twice is an error."""
    if cls.name in _METRICS and _METRICS[cls.name] is not cls:
        raise ValueError(
            f"an evaluation metric named {cls.name!r} is already registered ({_METRICS[cls.name].__module__})"
        )
    _METRICS[cls.name] = cls
    return cls


def metric_classes() -> dict[str, type[EvalMetric]]:
    """The always-on metric first, then the optional ones by name."""
    return dict(sorted(_METRICS.items(), key=lambda kv: (not kv[1].always, kv[0])))


def optional_metrics() -> tuple[str, ...]:
    return tuple(n for n, c in metric_classes().items() if not c.always)


def box_metrics() -> tuple[str, ...]:
    """The metrics that need bounding boxes: ``lcam eval`` adds them when the shards carry boxes."""
    return tuple(n for n, c in metric_classes().items() if c.needs_boxes)


def build_metrics(
    ratios: Sequence[float], enabled: Sequence[str] = (), options: Mapping[str, Mapping[str, Any]] | None = None
) -> list[EvalMetric]:
    """The always-on metrics and the ``enabled`` optional ones, with their options."""
    options = options or {}
    classes = metric_classes()
    unknown = sorted(set(enabled) - set(optional_metrics()))
    if unknown:
        raise KeyError(f"unknown metric(s) {', '.join(unknown)}; optional metrics: {', '.join(optional_metrics())}")
    return [c(ratios, **dict(options.get(n, {}))) for n, c in classes.items() if c.always or n in enabled]
