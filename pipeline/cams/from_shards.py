"""CAMs from WebDataset shards: the extraction's write path (``raykit.run_shard_stage``):
read and decode/preprocess on CPU tasks, then actors with the backbone and the attention
(one GPU per actor when the cluster has GPUs) that each take a whole shard and write its
group; the driver records manifest entries only. No cache needed."""

from __future__ import annotations

import math
import time
from typing import Any, Mapping

import numpy as np
import torch

from ..classes import ClassSelection
from ..configs import CamsConfig  # torch-free, no loop with pipeline.cams
from ..decoders import Decoder
from ..device import pad_lone_image
from ..fs import StorageOptions
from ..progress import Progress
from ..raykit import ShardWorker, actor_device, repin_threads
from ..store.cam_store import CamStore
from .explainer import Explainer, explain_rows

# The job's summary (pipeline.cams.run.CamsSummary) comes in as an argument: pipeline.cams
# dispatches to this module, so naming its type here would tie the two modules in a loop.
CamsSummary = Any


class CamActor:
    """Backbone + attention in an actor: (n, 1, 3, H, W) uint8 pixels -> the store's columns."""

    def __init__(
        self,
        checkpoint: str,
        storage_options: StorageOptions,
        weights: str | None,
        fingerprint: str,
        selection: ClassSelection,
        upsample_to: int | None,
        precision: str,
        torch_threads: int | None,
    ) -> None:
        device, self.threads = actor_device(torch_threads)
        self.explainer = Explainer.from_checkpoint(
            checkpoint, device=device, weights=weights, storage_options=storage_options, precision=precision
        )
        if self.explainer.fingerprint != fingerprint:
            raise RuntimeError(
                f"checkpoint {checkpoint} changed during the run (fingerprint {self.explainer.fingerprint}, expected {fingerprint}); re-run"
            )
        self.selection, self.upsample_to = selection, upsample_to
        # as in extraction: BatchNorm folded (same function and identity), channels-last on CPU and GPU
        model = self.explainer.model
        model.backbone = model.backbone.folded().to(memory_format=torch.channels_last)
        self.ready_at = time.time()  # wall clock: the driver compares it with its own

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        repin_threads(self.threads)
        ex, sel = self.explainer, self.selection
        model, dev = ex.model, ex.device
        pixels = batch["pixels"][:, 0]
        errors = np.array(batch["error"], dtype=object)
        labels = np.asarray(batch["label"], dtype=np.int64)
        if sel.mode == "label":
            errors[(labels < 0) & (errors == "")] = "no label: classes 'label' needs one"
            beyond = (labels >= model.attention.num_classes) & (errors == "")
            errors[beyond] = [f"label {lab} is not one of the classifier's classes" for lab in labels[beyond]]
        ok = errors == ""
        n, t, (h, w) = len(labels), sel.width, model.backbone.feature_shape[1:]
        out = {k: batch[k] for k in ("key", "label")}
        out.update(
            class_ids=np.full((n, t), -1, np.int32),
            probs=np.zeros((n, t), np.float32),
            raw=np.zeros((n, t, h, w), np.float16),
            predicted=np.full(n, -1, np.int32),
            predicted_prob=np.zeros(n, np.float32),
        )
        if self.upsample_to:
            out["upsampled"] = np.zeros((n, t, self.upsample_to, self.upsample_to), np.uint8)
        if ok.any():
            x = (
                torch.from_numpy(pixels[ok])
                .to(dev, non_blocking=True)
                .float()
                .div_(255.0)
                .contiguous(memory_format=torch.channels_last)
            )
            with torch.inference_mode():
                with ex.autocast_context():
                    feats, logits = model.backbone.extract(pad_lone_image(x))  # as in extraction
                feats, logits = feats[: len(x)], logits[: len(x)]
                rows = explain_rows(
                    model, feats.float(), sel, logits=logits.float(), labels=labels[ok], upsample_to=self.upsample_to
                )
            for k, v in rows.items():
                out[k][ok] = v
        out["error"] = errors.astype(str)
        return out


class CamWorker(ShardWorker):
    """The CAM stage's actor (shard source): a shard's decoded parts -> maps -> its group in
    the store, written here; returns the manifest entry only (see raykit.run_shard_stage)."""

    WRITE_ATTEMPTS = 3  # storage hiccups (OSError): the group is rewritten whole, so retrying is safe

    def __init__(self, store: CamStore, batch_size: int, *actor_args: Any) -> None:
        super().__init__()
        self.store, self.batch_size = store, batch_size
        self.model = CamActor(*actor_args)

    def process(self, item: dict[str, Any], *parts: Any) -> dict[str, Any]:
        url = item["url"]
        run = self.run_parts(parts, self.model, self.batch_size)
        if run.failed:
            return {"url": url, "failed": run.failed}
        del parts
        out = run.outputs  # {} when the shard has no row
        keep = out["error"] == "" if out else np.zeros(0, bool)
        skipped = (
            [{"key": str(k), "reason": str(e), "shard": url} for k, e in zip(out["key"][~keep], out["error"][~keep])]
            if out
            else []
        )
        fields = ("key", "label", "class_ids", "probs", "raw", "predicted", "predicted_prob") + (
            ("upsampled",) if self.store.upsampled_size else ()
        )
        rows = {k: out[k][keep] for k in fields} if out else {"key": np.zeros(0, dtype=str)}
        for attempt in range(1, self.WRITE_ATTEMPTS + 1):
            try:
                entry = self.store.write_shard(url, rows, skipped)
                break
            except OSError:
                if attempt == self.WRITE_ATTEMPTS:
                    raise
                time.sleep(attempt)
        entry.update(ready_at=self.model.ready_at, node_id=self.node_id())
        return entry


def cams_from_shards(
    cfg: CamsConfig,
    ckpt: Mapping[str, Any],
    store: CamStore,
    selection: ClassSelection,
    todo: list[Any],
    summary: CamsSummary,
    decoding: tuple[Decoder, bool],
) -> CamsSummary:
    """Explain the shards ``todo`` (not yet in the store) on Ray actors; counts go to ``summary``.
    ``decoding``: (the decoder, whether the actors decode), as the store's identity records it."""
    from lcam.backbones.preprocessing import Preprocessing

    from ..raykit import actor_pool, ensure_ray, run_shard_stage
    from ..shard_tasks import shard_parts

    t0, wall0 = time.perf_counter(), time.time()
    summary.ray_startup_seconds += ensure_ray()
    preprocessing = Preprocessing.from_dict(ckpt["backbone"]["preprocessing"])
    items = [
        {"url": s.url, "name": s.name, "count": s.count if s.count is not None else -1, "sha256": s.sha256 or ""}
        for s in todo
    ]
    actors, gpus = actor_pool(cfg.num_actors)
    decoder, in_actor = decoding
    progress = Progress(sum(s.count or 0 for s in todo) or None, cfg.progress, what="cams", unit="images")
    ready_at = math.inf

    def committed(entry: dict[str, Any]) -> None:  # driver: metadata in, manifest out
        nonlocal ready_at
        ready_at = min(ready_at, float(entry.pop("ready_at", math.inf)))
        summary.commit(store, entry)
        progress.update(int(entry["count"]) + len(entry["skipped"]))

    # The same write path as extraction (one shard per unit of work, the worker writes its
    # group, the driver records the manifest): pipeline.raykit.run_shard_stage.
    run_shard_stage(
        items,
        lambda item: shard_parts(
            item,
            storage_options=cfg.source_storage_options,
            preprocessing=preprocessing,
            views=("center",),
            part_rows=cfg.decode_batch_size,
            decoder=decoder,
            in_actor=in_actor,
        ),
        CamWorker,
        (
            store,
            cfg.batch_size,
            cfg.checkpoint,
            cfg.checkpoint_storage_options,
            cfg.weights,
            store.identity["checkpoint"]["fingerprint"],
            selection,
            store.upsampled_size,
            cfg.precision,
            cfg.torch_threads,
        ),
        actors=actors,
        gpus=gpus,
        on_result=committed,
        on_failure=lambda url, reason: summary.failed_shards.append({"url": url, "reason": reason}),
    )
    progress.close()
    summary.seconds = time.perf_counter() - t0
    if ready_at < math.inf:
        summary.actors_ready_seconds = max(0.0, ready_at - wall0)
    return summary
