"""L-CAM checkpoints on any fsspec URL: attention weights plus everything to resume and to trust.

A checkpoint is one ``torch.save`` payload of tensors and plain values (so it loads with
``weights_only=True``): the attention state, the method ("fm" or "img"), the backbone's
identity (name, weights, digest, preprocessing), the fingerprint of the cache it trained
from (if any), epoch/step, the coverage (per class row, how many training samples trained it), the training config, optimizer and scheduler state, and metrics.
Written atomically: a reader sees the previous checkpoint or the new one, never a part.
"""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import UserError
from ..fs import StorageOptions, get_fs, write_bytes_atomic

if TYPE_CHECKING:
    import torch

FORMAT = "lcam-checkpoint/1"


class CheckpointMismatch(UserError):
    """A checkpoint made for another backbone, weights or cache."""


def save_checkpoint(
    url: str,
    *,
    attention_state: Mapping[str, torch.Tensor],
    method: str,
    backbone: Mapping[str, Any],
    cache_fingerprint: str | None = None,
    epoch: int = 0,
    step: int = 0,
    config: Mapping[str, Any] | None = None,
    optimizer_state: Mapping[str, Any] | None = None,
    scheduler_state: Mapping[str, Any] | None = None,
    metrics: list[Mapping[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
    coverage: torch.Tensor | None = None,
    trained_rows: Mapping[str, torch.Tensor] | None = None,
    storage_options: StorageOptions = None,
) -> None:
    """``coverage``: (K,) per class row, the samples that trained it (``LCAMTrainer.coverage``);
    None when unknown (e.g. an attention not trained by this project). ``trained_rows``: when
    ``attention_state`` is an export whose untrained rows were filled (:mod:`lcam.uncovered`),
    the trained values of those rows (``index``, ``conv.weight``, ``conv.bias``), so that
    resuming continues from the trained state exactly."""
    payload = {
        "format": FORMAT,
        "method": method,
        "attention": {k: v.detach().cpu() for k, v in attention_state.items()},
        # JSON strings keep the payload within weights_only's safe types whatever they hold
        "backbone": json.dumps(dict(backbone), sort_keys=True),
        "cache_fingerprint": cache_fingerprint or "",
        "epoch": int(epoch),
        "step": int(step),
        "config": json.dumps(dict(config or {}), sort_keys=True, default=str),
        "metrics": json.dumps(list(metrics or []), default=float),
        "extra": json.dumps(dict(extra or {}), sort_keys=True, default=str),
        "optimizer": optimizer_state or {},
        "scheduler": scheduler_state or {},
    }
    import torch

    if coverage is not None:
        payload["coverage"] = torch.as_tensor(coverage).detach().cpu().to(torch.int32)
    if trained_rows is not None:
        payload["trained_rows"] = {k: v.detach().cpu() for k, v in trained_rows.items()}
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_bytes_atomic(url, buf.getvalue(), storage_options)


RUN_CHECKPOINT = (
    "checkpoint.pt"  # the file a run folder keeps its latest checkpoint in (pipeline.train.run_folder writes it)
)


def checkpoint_file(url: str, storage_options: StorageOptions = None) -> str:
    """``url`` itself, or ``url/checkpoint.pt`` when ``url`` is a run folder (what `lcam train --out` made):
    every command that takes a checkpoint takes the run folder too."""
    from ..fs import join

    fs, path = get_fs(url, storage_options)
    try:
        is_dir = fs.isdir(path)
    except Exception:  # an unreachable store answers when the file is read, with its own message
        return url
    if not is_dir:
        return url
    inner = join(url, RUN_CHECKPOINT)
    if not fs.exists(get_fs(inner, storage_options)[1]):
        raise UserError(
            f"{url} is a folder without {RUN_CHECKPOINT}; give a checkpoint file or a run folder made by `lcam train --out`"
        )
    return inner


def load_checkpoint(
    url: str, storage_options: StorageOptions = None, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """The checkpoint as a dict, JSON fields decoded; any missing, damaged or foreign file is
    one :class:`UserError` naming the file and what is wrong with it. A run folder stands for
    its ``checkpoint.pt``."""
    url = checkpoint_file(url, storage_options)
    fs, path = get_fs(url, storage_options)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise UserError(f"checkpoint {url!r} not found; train one with `lcam train` first") from None
    except IsADirectoryError:
        raise UserError(
            f"checkpoint {url!r} is a folder; give the checkpoint file in it (e.g. {url.rstrip('/')}/checkpoint.pt)"
        ) from None
    except PermissionError:
        raise UserError(
            f"checkpoint {url!r} cannot be read (permission denied); fix its permissions or give another file"
        ) from None
    payload = _unpickle(url, data, map_location)
    _check_payload(url, payload)
    return payload


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its class name (EOFError has none)."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(exc).__name__


def _unpickle(url: str, data: bytes, map_location: str | torch.device) -> dict[str, Any]:
    import torch

    if not data:
        raise UserError(
            f"checkpoint {url!r} is empty (0 bytes): it was cut while being written or copied; use another checkpoint (e.g. epoch-NNN.pt of the run) or train again"
        )
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # EOFError, zip reader errors, unpickling errors, unsupported globals
        cut = isinstance(exc, EOFError) or "central directory" in str(exc) or "failed reading" in str(exc)
        why = (
            "truncated or damaged: its zip structure is incomplete"
            if cut
            else f"not a readable PyTorch checkpoint ({_first_line(exc)[:100]})"
        )
        raise UserError(
            f"checkpoint {url!r} ({len(data)} bytes) is {why}; use another checkpoint (e.g. epoch-NNN.pt of the run) or train again"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise UserError(f"{url!r} is not an L-CAM checkpoint (format {found!r}, expected {FORMAT})")
    return payload


# What every checkpoint holds (save_checkpoint writes them all) and of which type
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "method": str,
    "attention": dict,
    "backbone": str,
    "cache_fingerprint": str,
    "epoch": int,
    "step": int,
    "config": str,
    "metrics": str,
    "extra": str,
    "optimizer": dict,
    "scheduler": dict,
}
_JSON_FIELDS: dict[str, type] = {"backbone": dict, "config": dict, "metrics": list, "extra": dict}


def _check_payload(url: str, payload: dict[str, Any]) -> None:
    """Decode the JSON fields and check keys, types and the attention's shapes, in place."""
    bad = f"checkpoint {url!r} is damaged or foreign:"
    for key, kind in _REQUIRED.items():
        if key not in payload:
            raise UserError(f"{bad} it has no {key!r} entry; use a checkpoint written by `lcam train`")
        if not isinstance(payload[key], kind):
            raise UserError(f"{bad} its {key!r} entry is a {type(payload[key]).__name__}, not a {kind.__name__}")
    for key, kind in _JSON_FIELDS.items():
        try:
            payload[key] = json.loads(payload[key])
        except ValueError as exc:
            raise UserError(f"{bad} its {key!r} entry is not valid JSON ({_first_line(exc)})") from None
        if not isinstance(payload[key], kind):
            raise UserError(f"{bad} its {key!r} entry is a JSON {type(payload[key]).__name__}, not a {kind.__name__}")
    payload.setdefault("coverage", None)  # checkpoints from before coverage was recorded
    payload.setdefault("trained_rows", None)  # no filled rows (or from before filling existed)
    _check_attention(url, payload["attention"], payload["backbone"])


def _check_attention(url: str, attention: Mapping[str, Any], backbone: Mapping[str, Any]) -> None:
    """The attention is a 1x1 conv from the backbone's C feature channels to its K classes."""
    try:
        channels, classes = int(backbone["feature_shape"][0]), int(backbone["num_classes"])
    except (KeyError, IndexError, TypeError, ValueError):
        raise UserError(
            f"checkpoint {url!r} is damaged or foreign: its backbone record lacks feature_shape/num_classes ({backbone!r:.120})"
        ) from None
    import torch

    expected = {"conv.weight": (classes, channels, 1, 1), "conv.bias": (classes,)}
    for key, shape in expected.items():
        value = attention.get(key)
        if not isinstance(value, torch.Tensor):
            raise UserError(
                f"checkpoint {url!r} is damaged or foreign: its attention has no tensor {key!r} (keys: {sorted(attention)[:6]})"
            )
        if tuple(value.shape) != shape:
            raise UserError(
                f"checkpoint {url!r} is damaged or foreign: attention {key} has shape {tuple(value.shape)}, "
                f"but its backbone {backbone.get('backbone')} needs {shape} ({channels} feature channels, {classes} classes)"
            )
    extra = sorted(set(attention) - set(expected))
    if extra:
        raise UserError(f"checkpoint {url!r} is damaged or foreign: its attention holds unexpected entries {extra[:6]}")


def checkpoint_summary(url: str, storage_options: StorageOptions = None) -> dict[str, Any]:
    """The checkpoint's plain fields (format, method, backbone, epoch, ...) without torch: its
    pickle is read with every tensor left out, so a command can check its options against the
    checkpoint (e.g. class ids against the classifier's classes) before torch loads (~seconds).
    Anything unexpected: {} (the full load then says what is wrong)."""
    import pickle
    import zipfile

    class NoTensors(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if module == "collections" and name == "OrderedDict":
                import collections

                return collections.OrderedDict
            return lambda *args, **kwargs: None  # torch's rebuild functions and classes: no tensor is made

        def persistent_load(self, pid: Any) -> Any:
            return None

    try:
        url = checkpoint_file(url, storage_options)
        fs, path = get_fs(url, storage_options)
        with zipfile.ZipFile(io.BytesIO(fs.cat_file(path))) as z:
            name = next(n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
            payload = NoTensors(io.BytesIO(z.read(name))).load()
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            return {}
        return {
            k: json.loads(payload[k]) if k in ("backbone", "config", "extra") else payload[k]
            for k in ("format", "method", "backbone", "epoch", "step", "config", "extra")
            if k in payload
        }
    except UserError:
        raise
    except Exception:
        return {}


def check_backbone(checkpoint: Mapping[str, Any], backbone: Mapping[str, Any], what: str = "this backbone") -> None:
    """Refuse a checkpoint trained on another backbone or other weights (digest compared)."""
    mine = checkpoint["backbone"]
    for field in ("backbone", "weights_digest", "feature_shape", "num_classes"):
        if mine.get(field) != backbone.get(field):
            raise CheckpointMismatch(
                f"the checkpoint was trained for {mine.get('backbone')} (weights {mine.get('weights')}, digest {str(mine.get('weights_digest'))[:12]}), "
                f"not for {what}: {backbone.get('backbone')} (weights {backbone.get('weights')}, digest {str(backbone.get('weights_digest'))[:12]}); "
                f"field {field!r} differs. Use a checkpoint trained on the same backbone and weights."
            )


def check_cache(checkpoint: Mapping[str, Any], fingerprint: str) -> None:
    """Refuse to resume from a checkpoint that trained on another feature cache."""
    theirs = checkpoint.get("cache_fingerprint") or ""
    if theirs and theirs != fingerprint:
        raise CheckpointMismatch(
            f"the checkpoint trained on the feature cache with fingerprint {theirs}, not on this one ({fingerprint}); "
            "resume only on the same cache, or start a new run (another checkpoint URL)"
        )


def load_lcam(
    url: str, storage_options: StorageOptions = None, weights: str | None = None, device: str | torch.device = "cpu"
):
    """Rebuild the trained explainer: (LCAM on ``device`` in eval mode, checkpoint dict).

    ``weights`` overrides where the backbone weights come from (e.g. a local copy of
    the file it was trained with); the digest must still match.
    """
    from lcam import LCAM, build_backbone

    ckpt = load_checkpoint(url, storage_options)
    ident = ckpt["backbone"]
    backbone = build_backbone(ident["backbone"], weights or ident.get("weights", "default"))
    check_backbone(ckpt, backbone.describe(), f"the backbone rebuilt from {weights or ident.get('weights')}")
    model = LCAM(backbone)
    model.attention.load_state_dict(ckpt["attention"])
    return model.to(device).eval(), ckpt
