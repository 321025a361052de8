"""Average Drop / Increase in Confidence at dataset scale (SPEC section 5): the public names.

Every method (L-CAM checkpoints and the registered CAM methods of :mod:`lcam.cam_methods`)
is scored on the same images read from WebDataset shards (centre crop), with the protocol
of :mod:`lcam.metrics`: predicted class, min-max at the map's own resolution, bilinear
upsampling, exactly ceil(r*H*W) kept pixels with their soft values, black masking in
pixel space, softmax scores; optional metrics (ROAD, insertion/deletion AUC) are plug-ins.

The work lives in :mod:`pipeline.evaluation` by responsibility (config, plan, engine,
metrics, results, render, run); this module gathers the names callers use.
"""

from __future__ import annotations

from .evaluation.config import EvalConfig, MethodSpec, method_specs, resolve_backbone, split_checkpoint_arg
from .evaluation.engine import EvalActor, Evaluator, choose_engine, pick_device, ray_read_decode, run_local, run_ray
from .evaluation.metrics import EvalMetric, MetricBatch, build_metrics, metric_classes, optional_metrics, register_metric
from .evaluation.metrics.adic import subset_table
from .evaluation.metrics.base import batch_seed
from .evaluation.plan import (
    DecodedBatch,
    Plan,
    PlannedBatch,
    decode_batch,
    decode_to_uint8,
    plan_batches,
    read_selected,
    shard_groups,
)
from .evaluation.render import render_charts, render_csv, render_markdown
from .evaluation.results import Collector, EvalResults, MethodResult, aggregate
from .evaluation.run import FORMAT, EvalSummary, evaluate, protocol_dict

__all__ = [
    "FORMAT", "Collector", "DecodedBatch", "EvalActor", "EvalConfig", "EvalMetric", "EvalResults", "EvalSummary", "Evaluator",
    "MethodResult", "MethodSpec", "MetricBatch", "Plan", "PlannedBatch", "aggregate", "batch_seed", "build_metrics",
    "choose_engine", "decode_batch", "decode_to_uint8", "evaluate", "method_specs", "metric_classes", "optional_metrics",
    "pick_device", "plan_batches", "protocol_dict", "ray_read_decode", "read_selected", "register_metric", "render_charts",
    "render_csv", "render_markdown", "resolve_backbone", "run_local", "run_ray", "shard_groups", "split_checkpoint_arg",
    "subset_table",
]
