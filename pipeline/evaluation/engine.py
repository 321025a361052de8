"""THE per-batch computation (:class:`Evaluator`) and the two engines that feed it.

One clean forward per batch is shared by all methods (so every method sees the same Y
and predicted class, and L-CAM's maps come from that forward's F at no extra pass), then
per method its maps and every metric plug-in on them. The local engine (one process,
decoding in a thread pool) and the Ray engine (Ray Data: one read+decode task per shard,
an actor pool holding the backbone and the methods, GPU when the cluster has one) feed
the same batches to :meth:`Evaluator.evaluate_batch`, so they give identical numbers.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pickle
import time
from collections import deque
from dataclasses import asdict
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from lcam.metrics.adic import DEFAULT_RATIOS

from ..configs import EvalConfig
from ..device import resolve_device
from ..errors import UserError
from ..fs import StorageOptions
from .config import MethodSpec
from .metrics.base import MetricBatch, batch_seed, build_metrics
from .plan import DecodedBatch, Plan, decode_batch, ray_read_decode, read_selected, shard_groups


class _ForwardCounter:
    """Counts images through ``backbone.features`` (every full forward passes there)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.images = 0
        self.listener: Callable[[int], None] | None = None  # set while a costly method runs
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        n = int(args[0].shape[0])
        self.images += n
        if self.listener is not None:
            self.listener(n)


class _Throttled:
    """Forwards of one method, handed on at most every ``every`` seconds (and at close)."""

    def __init__(self, method_id: str, report: Callable[[str, int], None], every: float = 2.0) -> None:
        self.method_id, self.report, self.every = method_id, report, every
        self.pending, self.last = 0, time.perf_counter()

    def __call__(self, n: int) -> None:
        self.pending += n
        if time.perf_counter() - self.last >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.report(self.method_id, self.pending)
        self.pending, self.last = 0, time.perf_counter()


class _ChannelsLast(torch.nn.Module):
    """The backbone fed channels-last input (masking and indexing hand back NCHW copies)."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x.contiguous(memory_format=torch.channels_last))


class Evaluator:
    """The backbone and the methods; :meth:`evaluate_batch` is THE computation of both engines."""

    def __init__(
        self,
        backbone: Any,
        specs: Sequence[MethodSpec],
        ratios: Sequence[float] = DEFAULT_RATIOS,
        *,
        metrics: Sequence[str] = (),
        metric_options: Mapping[str, Mapping[str, Any]] | None = None,
        forward_batch: int | None = 16,
        device: str | torch.device = "cpu",
        keep_maps: int = 0,
        fold_batchnorm: bool = True,
        on_method_forwards: Callable[[str, int], None] | None = None,
    ) -> None:
        """``on_method_forwards(method_id, n)``: called while a method with a known per-image
        cost (``forwards_per_image``: RISE, Score-CAM) computes its maps, so a long method
        shows progress between batches."""
        from lcam import LCAM
        from lcam.cam_methods.base import build_method
        from lcam.cam_methods.lcam_method import LCAMMethod

        self.device = torch.device(device)
        # an inference copy (Backbone.folded): every method, clean and masked passes share it
        self.backbone = (backbone.folded() if fold_batchnorm else backbone).to(self.device)
        self.ratios = tuple(float(r) for r in ratios)
        self.forward_batch = forward_batch
        # AD/IC always, then the optional metrics asked for (pipeline/evaluation/metrics)
        self.metrics = build_metrics(self.ratios, metrics, metric_options)
        self.keep_maps = keep_maps
        self.specs = list(specs)
        self.methods = []
        for s in self.specs:
            if s.kind == "lcam":
                model = LCAM(self.backbone)
                model.attention.load_state_dict(dict(s.attention_state or {}))
                self.methods.append(LCAMMethod(model.to(self.device).eval()))
            else:
                self.methods.append(build_method(s.kind, self.backbone, **dict(s.kwargs)))
        self.counter = _ForwardCounter(self.backbone.features)
        self.model = _ChannelsLast(self.backbone)
        self.on_method_forwards = on_method_forwards
        channels = self.backbone.feature_shape[0]
        self.reports_progress = [m.forwards_per_image(channels) is not None for m in self.methods]

    def close(self) -> None:
        """Remove the forward-counting hook from the backbone (it may be shared with the caller)."""
        self.counter.handle.remove()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def evaluate_batch(
        self,
        pixels: np.ndarray | torch.Tensor,
        ranks: Sequence[int],
        batch_id: int,
        boxes: Sequence[np.ndarray] | None = None,
    ) -> dict[str, Any]:
        """Score one batch with every method.

        ``pixels``: (n, 3, H, W) uint8 centre crops; ``ranks``: each image's rank (method
        subsets); ``batch_id`` seeds the random map and ROAD's imputation noise; ``boxes``:
        per image its (k, 4) boxes on the crop's pixel grid, for the localisation metrics. Returns
        plain numpy/Python values: ``class_ids`` and ``Y`` (n,), and per method the batch
        indices it scored, its map's seconds and forwards, and per metric NAME its per-image
        arrays (``entry[NAME]``, e.g. AD/IC's ``O`` (R, m)), ``NAME_seconds`` and ``NAME_forwards``.
        """
        from lcam.cam_methods.lcam_method import LCAMMethod

        # One memory format whatever the pixels' strides: oneDNN picks other kernels (other
        # rounding) per layout, and the engines deliver different strides. Channels-last:
        # measured 1.5-2x faster than NCHW for batches of 8-16 on CPU, and the GPU choice.
        x = torch.as_tensor(pixels).to(self.device).float().div_(255).contiguous(memory_format=torch.channels_last)
        ranks_t = torch.as_tensor(np.asarray(ranks, dtype=np.int64))
        self._sync()
        t0, c0 = time.perf_counter(), self.counter.images
        with torch.no_grad():
            feats, logits = self.backbone.extract(x)
            probs = logits.float().softmax(1)
        ids = probs.argmax(1)
        self._sync()
        out: dict[str, Any] = {
            "batch_id": int(batch_id),
            "class_ids": ids.cpu().numpy(),
            "Y": probs.gather(1, ids[:, None])[:, 0].cpu().numpy(),
            "clean_seconds": time.perf_counter() - t0,
            "clean_forwards": self.counter.images - c0,
            "methods": {},
        }
        keep = torch.nonzero(ranks_t < self.keep_maps)[:, 0]
        if len(keep):  # images for the report's gallery: their pixels and every method's map
            out["gallery"] = {"index": keep.numpy(), "pixels": np.asarray(torch.as_tensor(pixels)[keep])}
        for spec, method, reports in zip(self.specs, self.methods, self.reports_progress):
            sel = torch.arange(x.shape[0]) if spec.limit is None else torch.nonzero(ranks_t < spec.limit)[:, 0]
            if len(sel) == 0:
                continue
            whole = len(sel) == x.shape[0]
            xs = x if whole else x[sel.to(self.device)]
            ids_s = ids if whole else ids[sel.to(self.device)]
            t1, c1 = time.perf_counter(), self.counter.images
            if method.reseed_per_batch:  # seeded by the batch's position: the same maps on any engine or worker
                method.reseed(batch_seed(spec.kwargs.get("seed", 0), batch_id))
            listener = _Throttled(spec.id, self.on_method_forwards) if reports and self.on_method_forwards else None
            self.counter.listener = listener
            try:
                if isinstance(method, LCAMMethod):  # F and the logits of the shared clean forward
                    f_s, l_s = (feats, logits) if whole else (feats[sel.to(self.device)], logits[sel.to(self.device)])
                    cams = method.from_features(f_s, ids_s, l_s)
                else:
                    cams = method(xs, ids_s)
            finally:
                self.counter.listener = None
                if listener is not None:
                    listener.flush()
            self._sync()
            entry: dict[str, Any] = {
                "index": sel.numpy(),
                "map_seconds": time.perf_counter() - t1,
                "map_forwards": self.counter.images - c1,
            }
            batch = MetricBatch(
                self.model,
                self.backbone,
                xs,
                cams,
                ids_s,
                probs if whole else probs[sel.to(self.device)],
                int(batch_id),
                self.forward_batch,
                None if boxes is None else [boxes[i] for i in sel.tolist()],
            )
            for metric in self.metrics:
                t2, c2 = time.perf_counter(), self.counter.images
                entry[metric.name] = metric.compute(batch)
                self._sync()
                entry[f"{metric.name}_seconds"] = time.perf_counter() - t2
                entry[f"{metric.name}_forwards"] = self.counter.images - c2
            if len(keep):
                kept = torch.nonzero(ranks_t[sel] < self.keep_maps)[:, 0]
                entry["maps"] = {"index": sel[kept].numpy(), "maps": cams[kept.to(cams.device)].float().cpu().numpy()}
            out["methods"][spec.id] = entry
        return out


def pick_device(device: str) -> str:
    """The evaluation's device type (``cpu``/``cuda``), resolved the one way (``pipeline.device``)."""
    return resolve_device(device).type


# ---------------------------------------------------------------------------- engines


def choose_engine(engine: str) -> str:
    if engine == "auto":
        import importlib.util

        if os.environ.get("RAY_ADDRESS"):
            return "ray"
        if importlib.util.find_spec("ray") is not None:
            import ray

            return "ray" if ray.is_initialized() else "local"
        return "local"
    if engine not in ("local", "ray"):
        raise UserError(f"unknown engine {engine!r}; use auto, local or ray")
    return engine


def _prefetch(calls: Iterable[Callable[[], Any]], pool: concurrent.futures.Executor, depth: int) -> Iterator[Any]:
    """Results of ``calls`` in order, running up to ``depth`` of them ahead in ``pool``."""
    pending: deque[concurrent.futures.Future] = deque()
    for call in calls:
        pending.append(pool.submit(call))
        if len(pending) > depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def run_local(
    plan: Plan,
    evaluator: Evaluator,
    prep: Any,
    storage_options: StorageOptions,
    decode_workers: int,
    on_batch: Callable[[DecodedBatch, dict | None], None],
) -> None:
    """One process: a reader thread reads one shard ahead, a pool decodes batches ahead of the device."""
    groups = shard_groups(plan)
    workers = max(1, decode_workers)
    with (
        concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="eval-read") as reader,
        concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="eval-decode") as decoder,
    ):
        shard_samples = _prefetch((partial(read_selected, g, storage_options) for g in groups), reader, depth=1)

        def decode_calls() -> Iterator[Callable[[], DecodedBatch]]:
            for group, samples in zip(groups, shard_samples):
                for b in group:
                    yield partial(decode_batch, b, samples[b.batch_id], prep)

        for decoded in _prefetch(decode_calls(), decoder, depth=workers):
            result = (
                evaluator.evaluate_batch(decoded.pixels, decoded.ranks, decoded.batch_id, decoded.boxes)
                if len(decoded.keys)
                else None
            )
            on_batch(decoded, result)


class EvalActor:
    """Ray actor: builds the backbone and the methods once, then scores pickled batches."""

    def __init__(
        self, backbone_name: str, weights: str, digest: str, specs: list[MethodSpec], options: dict[str, Any]
    ) -> None:
        from lcam import build_backbone

        from ..raykit import actor_device

        dev, self.threads = actor_device(options.get("torch_threads"))
        device = dev.type
        backbone = build_backbone(backbone_name, weights)
        if backbone.weights_digest() != digest:
            raise UserError(
                f"the {backbone_name} weights {weights!r} on this worker differ from the driver's (digest "
                f"{backbone.weights_digest()[:12]} vs {digest[:12]}); give every node the same weights file"
            )
        queue = options.get("progress_queue")

        def relay(method_id: str, n: int) -> None:
            try:
                queue.put_nowait((method_id, n))
            except Exception:  # full or gone: progress is best effort, the scores are not affected
                pass

        self.evaluator = Evaluator(
            backbone,
            specs,
            options["ratios"],
            metrics=options["metrics"],
            metric_options=options["metric_options"],
            forward_batch=options["forward_batch"],
            device=device,
            keep_maps=options.get("keep_maps", 0),
            fold_batchnorm=options.get("fold_batchnorm", True),
            on_method_forwards=relay if queue is not None else None,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ..raykit import repin_threads

        repin_threads(self.threads)  # unconditionally: torch reports the count it was last given, not this thread's
        payloads = []
        for bid, payload in zip(batch["batch_id"], batch["payload"]):
            d = pickle.loads(payload)
            if int(bid) < 0:  # a shard read error passes through to the driver
                payloads.append(payload)
                continue
            result = self.evaluator.evaluate_batch(d.pixels, d.ranks, d.batch_id, d.boxes) if len(d.keys) else None
            d.pixels = d.pixels[:0]  # the driver needs the metadata, not the pixels
            payloads.append(pickle.dumps((d, result)))
        return {"batch_id": np.asarray(batch["batch_id"]), "payload": np.array(payloads, dtype=object)}


def run_ray(
    plan: Plan,
    cfg: EvalConfig,
    backbone: Any,
    specs: Sequence[MethodSpec],
    on_batch: Callable[[DecodedBatch, dict | None], None],
    on_method_forwards: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Ray Data: read+decode tasks per shard -> actor pool (backbone + methods) -> the driver.

    ``on_method_forwards``: the actors' progress inside costly methods reaches it through a
    small Ray queue, drained by a driver thread (a few tuples every two seconds per actor)."""
    import threading

    import ray
    from ray.data import ActorPoolStrategy
    from ray.util.queue import Queue

    from ..raykit import ensure_ray

    startup = ensure_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = cfg.actors or (gpus or 1)
    items = [{"url": g[0].shard_url, "batches": json.dumps([asdict(b) for b in g])} for g in shard_groups(plan)]
    options = {
        "ratios": cfg.ratios,
        "forward_batch": cfg.batch_size,
        "metrics": tuple(cfg.metrics),
        "metric_options": dict(cfg.metric_options),
        "torch_threads": cfg.torch_threads,
        "keep_maps": cfg.save_maps,
        "fold_batchnorm": cfg.fold_batchnorm,
    }
    queue, stop = None, threading.Event()
    if on_method_forwards is not None:
        queue = Queue(maxsize=1000, actor_options={"num_cpus": 0})
        options["progress_queue"] = queue

        def drain() -> None:
            while not stop.is_set():
                try:
                    on_method_forwards(*queue.get(timeout=1.0))
                except Exception:  # Empty, or the queue gone at shutdown
                    continue

        threading.Thread(target=drain, daemon=True, name="eval-progress").start()
    ds = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .flat_map(
            ray_read_decode,
            fn_kwargs={"prep": backbone.preprocessing, "storage_options": cfg.shard_storage_options},
            num_cpus=1,
        )
        .map_batches(
            EvalActor,
            fn_constructor_args=(backbone.name, backbone.weights_name, backbone.weights_digest(), list(specs), options),
            batch_size=1,
            compute=ActorPoolStrategy(size=actors),
            num_gpus=1 if gpus else 0,
            num_cpus=0 if gpus else 1,
        )
    )
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            for bid, payload in zip(batch["batch_id"], batch["payload"]):
                if int(bid) < 0:
                    raise UserError(
                        f"evaluation stopped: shard {pickle.loads(payload)['error']}; re-download or re-pack that shard"
                    )
                decoded, result = pickle.loads(payload)
                on_batch(decoded, result)
    finally:
        stop.set()
        if queue is not None:
            ray.kill(queue.actor)
    return {"ray_startup_seconds": startup, "actors": actors, "gpus_per_actor": 1 if gpus else 0}
