"""A training run's folder and its records (any fsspec URL, all writes atomic)::

    checkpoint.pt        latest state (attention, optimizer, scheduler, position, RNG)
    epoch-NNN.pt         the state after each completed epoch (the --keep most recent are kept)
    best.pt              the epoch that explained the held-back validation samples best (lowest
                         validation loss; without validation samples, the last epoch)
    metrics.jsonl        one JSON record per logged step window and per epoch
    curves.png           the loss terms, agreement and learning rate over the run

:class:`RunFolder` writes and reads them; :func:`trainer_state_from_checkpoint` turns a
checkpoint back into a trainer state (exact resume); :class:`StepWindow` and
:func:`epoch_record` make the metrics records, :func:`plot_curves` the plot.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from ..errors import UserError
from ..fs import StorageOptions, exists, get_fs, is_local, join, write_bytes_atomic
from ..store.leases import WriterLeases, announce_writers
from .checkpoints import RUN_CHECKPOINT, load_checkpoint, save_checkpoint

CHECKPOINT = RUN_CHECKPOINT
BEST = "best.pt"
METRICS = "metrics.jsonl"
CURVES = "curves.png"


class RunFolder:
    """Checkpoints, metrics and plot of one run at an fsspec URL (all writes atomic)."""

    def __init__(self, url: str, storage_options: StorageOptions = None) -> None:
        self.url = url.rstrip("/")
        self.storage_options = storage_options

    def path(self, name: str) -> str:
        return join(self.url, name)

    def checkpoint_for_start(self, resume: bool) -> dict[str, Any] | None:
        """The checkpoint to resume from, None for a fresh run; refuses to overwrite a run."""
        have = exists(self.path(CHECKPOINT), self.storage_options)
        if resume:
            if not have:
                raise UserError(
                    lambda flag: (
                        f"nothing to resume: no {CHECKPOINT} in {self.url}; start the run without {flag('resume')}"
                    )
                )
            return load_checkpoint(self.path(CHECKPOINT), self.storage_options)
        if have:
            raise UserError(
                lambda flag: (
                    f"{self.url} already holds a training run ({CHECKPOINT}); continue it with {flag('resume')} or choose another {flag('out')}"
                )
            )
        return None

    @contextlib.contextmanager
    def writing(self, what: str) -> Iterator[list[str]]:
        """Hold this run's writer lease in ``leases/`` while training: a second ``lcam train``
        (or ``--resume``) into the same folder is told who holds it (the notices, yielded)."""
        fs, path = get_fs(self.url, self.storage_options)
        path = path.rstrip("/")
        made = [path] if not fs.exists(path) else []  # the folders this lease creates, innermost first
        while made and made[-1].rsplit("/", 1)[0] and not fs.exists(made[-1].rsplit("/", 1)[0]):
            made.append(made[-1].rsplit("/", 1)[0])
        leases = WriterLeases(fs, path)
        notices = announce_writers(leases, what, self.url)
        lease = leases.take({"what": what})
        try:
            yield notices
        finally:
            leases.drop(lease)
            for folder in (leases.folder, *made):  # a refused run leaves nothing behind
                if is_local(fs) and fs.isdir(folder) and not fs.ls(folder):
                    fs.rmdir(folder)

    def save(
        self,
        state: Mapping[str, Any],
        *,
        method: str,
        backbone: Mapping[str, Any],
        cache_fingerprint: str | None,
        config: Mapping[str, Any],
        history: list[dict[str, Any]],
        epoch_end: bool,
        fill: Callable[[Mapping[str, torch.Tensor], torch.Tensor], Any] | None = None,
        best: bool = False,
        keep: int = 0,
    ) -> None:
        """``fill``: (trained attention state, coverage) -> :class:`lcam.uncovered.FillResult`: the
        checkpoint's ``attention`` (what ``lcam cams``/``lcam eval``/``--init-from`` read) is its
        state, the trained values of the rows it replaced go to ``trained_rows`` (resume).
        ``best`` (an epoch end): also written as ``best.pt``; ``keep`` > 0: only the ``keep`` most
        recent ``epoch-NNN.pt`` stay (older ones are removed after the new one is written)."""
        pos = state["position"]
        coverage = torch.maximum(state["coverage"]["epoch"], state["coverage"]["max"]) if "coverage" in state else None
        extra = {
            "position": pos,
            "running": state["running"],
            "rng": _encode_rng(state["rng"]),
            "coverage_state": {k: v.tolist() for k, v in state["coverage"].items()} if "coverage" in state else None,
        }
        attention, trained_rows = state["attention"], None
        if fill is not None and coverage is not None:
            result = fill(state["attention"], coverage)
            extra["uncovered"] = result.record()
            if result.replaced:
                index = torch.tensor(result.replaced, dtype=torch.int64)
                attention = result.state
                trained_rows = {"index": index, **{k: v[index].clone() for k, v in state["attention"].items()}}
        kw = dict(
            attention_state=attention,
            method=method,
            backbone=backbone,
            cache_fingerprint=cache_fingerprint,
            epoch=pos["epoch"],
            step=pos["global_step"],
            config=config,
            optimizer_state=state["optimizer"],
            scheduler_state=state["scheduler"],
            metrics=history,
            storage_options=self.storage_options,
            extra=extra,
            coverage=coverage,
            trained_rows=trained_rows,
        )
        if epoch_end:  # the per-epoch copy first: checkpoint.pt never points past a missing epoch file
            save_checkpoint(self.path(f"epoch-{pos['epoch']:03d}.pt"), **kw)
            if best:
                save_checkpoint(self.path(BEST), **kw)
        save_checkpoint(self.path(CHECKPOINT), **kw)
        if epoch_end and keep > 0:
            self.prune_epochs(keep)

    def chosen(self) -> str:
        """The checkpoint to explain with: best.pt when the run has one, else checkpoint.pt (a run stopped before its first epoch ended)."""
        return self.path(BEST) if exists(self.path(BEST), self.storage_options) else self.path(CHECKPOINT)

    def prune_epochs(self, keep: int) -> list[str]:
        """Remove all but the ``keep`` most recent ``epoch-NNN.pt`` files; returns the removed names."""
        fs, base = get_fs(self.url, self.storage_options)
        try:
            names = sorted(p.rsplit("/", 1)[-1] for p in fs.glob(f"{base}/epoch-*.pt"))
        except FileNotFoundError:
            return []
        old = names[:-keep] if keep > 0 else []
        for name in old:
            fs.rm(f"{base}/{name}")
        return old

    def write_metrics(self, history: Sequence[Mapping[str, Any]]) -> None:
        # Rewritten whole (small): object stores cannot append, and a resumed run drops
        # the records of steps it re-does.
        body = "".join(json.dumps(r, sort_keys=True) + "\n" for r in history)
        write_bytes_atomic(self.path(METRICS), body.encode(), self.storage_options)

    def read_metrics(self) -> list[dict[str, Any]]:
        fs, path = get_fs(self.path(METRICS), self.storage_options)
        try:
            text = fs.cat_file(path).decode()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def write_curves(self, history: Sequence[Mapping[str, Any]], title: str) -> None:
        write_bytes_atomic(self.path(CURVES), plot_curves(history, title), self.storage_options)

    def finish(self, history: Sequence[Mapping[str, Any]], title: str) -> tuple[str | None, int | None]:
        """A run's end: its records and loss curves written; returns (best.pt's path, its epoch) when
        the run kept one (validation), else (None, None)."""
        self.write_metrics(history)
        self.write_curves(history, title)
        if not exists(self.path(BEST), self.storage_options):
            return None, None
        return self.path(BEST), best_epoch(history)


def trainer_state_from_checkpoint(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :meth:`RunFolder.save`: a state for ``LCAMTrainer.load_state_dict``."""
    extra = ckpt["extra"]
    attention = ckpt["attention"]
    rows = ckpt.get("trained_rows")
    if rows is not None:  # an export with filled rows: put the trained values back
        attention = {k: v.clone() for k, v in attention.items()}
        for k, v in attention.items():
            v[rows["index"]] = rows[k]
    return {
        "attention": attention,
        "optimizer": ckpt["optimizer"],
        "scheduler": ckpt["scheduler"],
        "position": extra["position"],
        "running": extra["running"],
        "rng": _decode_rng(extra.get("rng") or {}),
        **(
            {"coverage": {k: torch.tensor(v, dtype=torch.int64) for k, v in extra["coverage_state"].items()}}
            if extra.get("coverage_state")
            else {}
        ),
    }


def _encode_rng(rng: Mapping[str, torch.Tensor]) -> dict[str, str]:
    return {k: base64.b64encode(v.cpu().numpy().tobytes()).decode() for k, v in rng.items()}


def _decode_rng(rng: Mapping[str, str]) -> dict[str, torch.Tensor]:
    return {k: torch.frombuffer(bytearray(base64.b64decode(v)), dtype=torch.uint8) for k, v in rng.items()}


def history_until(history: Sequence[Mapping[str, Any]], step: int) -> list[dict[str, Any]]:
    """Records up to ``step``: what a run resumed at that step keeps."""
    return [dict(r) for r in history if int(r.get("step", 0)) <= step]


def epoch_record(epoch: int, step: int, sums: Any, lr: float, seconds: float, **extra: Any) -> dict[str, Any]:
    rec = {
        "kind": "epoch",
        "epoch": epoch,
        "step": step,
        "samples": int(sums.n),
        "lr": lr,
        "seconds": round(seconds, 3),
        "samples_per_s": round(sums.n / seconds, 2) if seconds > 0 else 0.0,
    }
    rec.update({k: round(v, 6) for k, v in sums.means().items()})
    rec.update(extra)
    return rec


def validation_fields(sums: Any) -> dict[str, Any]:
    """An epoch record's validation fields (``val_loss``, ``val_ce``, ...) from a held-back part's metric sums."""
    return {"val_samples": int(sums.n), **{f"val_{k}": round(v, 6) for k, v in sums.means().items()}}


def best_epoch(history: Sequence[Mapping[str, Any]]) -> int | None:
    """The epoch with the lowest validation loss among the epoch records (the first of ties), or None without validation."""
    scored = [
        (r["val_loss"], r["epoch"]) for r in history if r.get("kind") == "epoch" and r.get("val_loss") is not None
    ]
    return min(scored)[1] if scored else None


def format_epoch(r: Mapping[str, Any]) -> str:
    return (
        f"epoch {r['epoch']}: loss {r['loss']:.4f} (ce {r['ce']:.4f}, area {r['area']:.4f}, tv {r['tv']:.4f}), "
        f"agreement {100 * r['agreement']:.1f}%, lr {r['lr']:.3g}, {r['samples']} samples in {r['seconds']:.1f}s "
        f"({r['samples_per_s']:.3g} samples/s)"
        + (
            f"; validation loss {r['val_loss']:.4f} (ce {r['val_ce']:.4f}, area {r['val_area']:.4f}), agreement "
            f"{100 * r['val_agreement']:.1f}% on {r['val_samples']} held-back samples"
            if r.get("val_loss") is not None
            else ""
        )
    )


class StepWindow:
    """Averages steps between metrics records (``log_every`` steps each)."""

    def __init__(self) -> None:
        from lcam.training import MetricSums

        self._cls = MetricSums
        self.sums = MetricSums()
        self.t0 = time.perf_counter()

    def add(self, stats: Any) -> None:
        self.sums.add(stats.n, stats.loss, stats.ce, stats.area, stats.tv, stats.agree)

    def record(self, epoch: int, step: int, steps_per_epoch: int, lr: float) -> dict[str, Any]:
        dt = time.perf_counter() - self.t0
        rec = {
            "kind": "step",
            "epoch": epoch,
            "step": step,
            "epoch_progress": round(step / steps_per_epoch, 4),
            "lr": lr,
            "samples": int(self.sums.n),
            "samples_per_s": round(self.sums.n / dt, 2) if dt > 0 else 0.0,
        }
        rec.update({k: round(v, 6) for k, v in self.sums.means().items()})
        self.sums, self.t0 = self._cls(), time.perf_counter()
        return rec


def plot_curves(history: Sequence[Mapping[str, Any]], title: str = "L-CAM training") -> bytes:
    """PNG: total loss, its three terms, agreement and lr against epochs (steps as thin lines)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    steps = [r for r in history if r.get("kind") == "step"]
    epochs = [r for r in history if r.get("kind") == "epoch"]
    fig = Figure(figsize=(13, 7), dpi=100)
    panels = [
        ("loss", "total loss"),
        ("ce", "cross-entropy (masked)"),
        ("area", "area term"),
        ("tv", "total variation"),
        ("agreement", "agreement (masked argmax = target)"),
        ("lr", "learning rate (weights)"),
    ]
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(2, 3, i + 1)
        if steps:
            ax.plot([r["epoch_progress"] for r in steps], [r[key] for r in steps], lw=0.8, alpha=0.6, label="steps")
        if epochs:
            ax.plot([r["epoch"] for r in epochs], [r[key] for r in epochs], "o-", lw=1.5, label="epoch mean")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if key == "lr" and any(r.get("lr", 0) > 0 for r in history):
            ax.set_yscale("log")
        if i == 0 and steps and epochs:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
