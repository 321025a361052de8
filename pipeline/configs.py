"""The stages' config dataclasses, each field declared once with its command-line option.

Torch-free on purpose: ``lcam <cmd> --help`` builds its options from these declarations
(``jobs/options.py``) without importing the stages, which import torch and Ray.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

from .decoders import DECODE_SITE_HELP, DECODE_SITES, DECODER_HELP, DECODERS, DEFAULT_DECODER
from .errors import UserError
from .options import BACKBONE_HELP, PRECISION_HELP, PRECISIONS, comma_list, derived, opt, storage

if TYPE_CHECKING:
    from .fs import StorageOptions

VIEWS = ("center", "hflip")
# Samples per decode task: a 1,000-image shard decodes on 8 CPUs at once (a GPU node of
# cluster.yaml has 8 vCPUs), while each task still amortises its start (~ms) over >100 images.
DECODE_PART_ROWS = 128
# lcam audit's map statistics (pipeline/audit_stats.py)
BORDER_BAND = 0.1  # a pixel is in the border band when its centre is within 10% of the side from an edge
TOP_FRACTION = 0.15  # the "region" of a map for overlaps: its top 15% pixels (the evaluation's smallest keep ratio)


@dataclass
class ExtractConfig:
    """Everything ``lcam extract`` needs."""

    shards: str | list[str] = opt(
        help="shard URLs: a pattern (train-{000000..000146}.tar, *.tar) or a folder/prefix with index.json",
        positional=True,
    )
    cache: str = opt(help="feature cache URL (local path, s3://, gs://)", positional=True)
    backbone: str = opt("efficientnet_lite0", BACKBONE_HELP)  # --layer folds into this spec (jobs/extract.py)
    weights: str = opt(
        "default", "'default' (pretrained), a torchvision weight name, a checkpoint path/URL, or 'random'"
    )
    views: tuple[str, ...] = opt(
        ("center",), "comma-separated: center, hflip (default center)", parse=comma_list, cli_default="center"
    )
    dtype: str = opt("float16", "how the features are stored", choices=("float16", "bfloat16", "float32"))
    decoder: str = opt(DEFAULT_DECODER, DECODER_HELP, choices=DECODERS)
    decode_on: str = opt("auto", DECODE_SITE_HELP, choices=DECODE_SITES)
    batch_size: int = opt(32, "images per backbone forward", min=1, range_text="a positive number of images")
    num_actors: int | None = opt(None, "backbone actors (default: one per GPU, else 1)", flag="--actors", min=1)
    decode_batch_size: int = derived(
        DECODE_PART_ROWS, "images per decode task: one shard decodes in parallel parts (a tuning constant)"
    )
    store_logits: bool = opt(False, "also store the full logits", kind="switch", flag="--logits")
    precision: str = opt("auto", PRECISION_HELP, choices=PRECISIONS)
    torch_threads: int | None = opt(None, "CPU actors: torch threads (default: all cores of the node)", min=1)
    index: str | None = opt(None, "shard index URL (default: index.json beside the shards)")
    shard_storage_options: StorageOptions = storage(" for the shards", "--shard-storage-option")
    cache_storage_options: StorageOptions = storage(" for the cache", "--cache-storage-option")
    progress: bool = opt(True, "no progress bar or progress lines", kind="negated", flag="--no-progress")

    def check(self) -> None:
        """The rules between fields (:func:`pipeline.options.validate` runs the declared ones first)."""
        if not self.views:
            raise UserError(f"--views names no view; choose from {', '.join(VIEWS)}")
        for v in self.views:
            if v not in VIEWS:
                raise UserError(f"--views: unknown view {v!r}; choose from {', '.join(VIEWS)}")


@dataclass
class CamsConfig:
    """Everything ``lcam cams`` needs (one of ``cache`` and ``shards`` is the source)."""

    checkpoint: str = opt(
        help="L-CAM checkpoint URL (L-CAM-Fm or L-CAM-Img); or the word 'info' to describe a store: lcam cams info URL",
        positional=True,
    )
    out: str = opt(
        help="CAM store URL to write (local path, s3://, gs://); with 'info', the store to describe", positional=True
    )
    cache: str | None = opt(
        None, "feature cache URL: no image is read, a matrix product per chunk", group="source (exactly one)"
    )
    shards: str | list[str] | None = opt(
        None,
        "WebDataset shards (pattern, .tar or folder with index.json): one forward pass per image on Ray",
        group="source (exactly one)",
    )
    classes: str | None = opt(
        None,
        "which classes per sample: predicted, label, top-k, top5 (any k), ids, or a combination side by side "
        "such as predicted,label or top5,label (default predicted; implied by --top-k or --class-ids)",
        group="classes",
    )
    top_k: int | None = opt(None, "explain the K most probable classes", min=1, group="classes")
    class_ids: str | Sequence[int] | None = opt(
        None, "explain these class ids for every sample, e.g. 281,285", group="classes"
    )
    upsample: bool = opt(False, "also store maps at the input size as uint8", kind="switch")
    view: str = opt(
        "center", "which cached view to explain (cache source; default center)", group="source (exactly one)"
    )
    weights: str | None = opt(None, "where the backbone weights come from (default: as recorded in the checkpoint)")
    batch_size: int = opt(64, "samples per forward or per matrix product", min=1, group="compute")
    num_actors: int | None = opt(
        None,
        "backbone actors (shard source) or model actors (cache source on Ray); default: one per GPU, else 1",
        flag="--actors",
        min=1,
        group="compute",
    )
    decode_batch_size: int = derived(
        DECODE_PART_ROWS, "shard source: images per decode task (pipeline.extract's tuning constant)"
    )
    decoder: str = opt(DEFAULT_DECODER, "shard source: " + DECODER_HELP, choices=DECODERS, group="compute")
    decode_on: str = opt("auto", "shard source: " + DECODE_SITE_HELP, choices=DECODE_SITES, group="compute")
    precision: str = opt(
        "auto", "shard source: the backbone's autocast; " + PRECISION_HELP, choices=PRECISIONS, group="compute"
    )
    torch_threads: int | None = opt(
        None,
        "CPU torch threads per actor (default: all cores); cache source in this process: "
        "threads of the matrix products (default: half the cores, the rest read the cache)",
        min=1,
        group="compute",
    )
    device: str = opt("auto", "cache source: auto, cpu, cuda, cuda:1", group="compute")
    where: str = opt(
        "auto",
        "cache source: local = in this process; ray = on model actors (one per GPU of the cluster, or --actors), "
        "each writing whole shards; auto (default) = ray when there is a cluster (RAY_ADDRESS set), else local",
        choices=("auto", "local", "ray"),
        group="compute",
    )
    index: str | None = opt(
        None, "shard index URL (default: index.json beside the shards)", group="source (exactly one)"
    )
    overlays: int = opt(0, "write N overlay PNGs and an HTML gallery (default 0)", min=0, group="pictures")
    gallery: str | None = opt(None, "gallery URL (default OUT/gallery)", group="pictures")
    colormap: str = opt("jet", "matplotlib colormap (jet, viridis, inferno, turbo, ...)", group="pictures")
    opacity: float = opt(0.5, "colour map opacity over the image, 0..1 (default 0.5)", min=0, max=1, group="pictures")
    class_names: str | None = opt(
        None, "class names file (TSV/CSV with a 'name' column, or a name a line); default ImageNet", group="pictures"
    )
    checkpoint_storage_options: StorageOptions = storage(" for the checkpoint", "--checkpoint-storage-option")
    source_storage_options: StorageOptions = storage(" for the cache or the shards", "--source-storage-option")
    out_storage_options: StorageOptions = storage(" for the CAM store and gallery", "--out-storage-option")
    progress: bool = opt(
        True, "no progress lines", kind="negated", flag="--no-progress", aliases=("--quiet",), dest="quiet"
    )

    def check(self) -> None:
        """One source, and a class selection that parses (the class ids' range needs the checkpoint: the stage checks it)."""
        from .classes import ClassSelection

        if self.checkpoint is None or self.out is None:
            raise UserError(
                "give the checkpoint (or run folder) and the CAM store: lcam cams CHECKPOINT OUT --cache URL"
            )
        if (self.cache is None) == (self.shards is None):
            raise UserError(
                "give exactly one source: a feature cache (--cache URL) or WebDataset shards (--shards PATTERN)"
            )
        ClassSelection.parse(self.classes, self.top_k, self.class_ids)


def use_gpu_choice(text: str | bool | None) -> bool | None:
    """``--use-gpu auto|yes|no`` -> None (when the cluster has GPUs) | True | False."""
    if text is None or isinstance(text, bool):
        return text
    return {"auto": None, "yes": True, "no": False}[text]


@dataclass
class TrainConfig:
    """Everything ``lcam train`` needs; None means "the per-backbone default" (SPEC 3) or "from the checkpoint"."""

    method: str | None = opt(
        None,
        "fm: from the feature cache (default); img: from the image shards (--resume: the run's)",
        choices=("fm", "img"),
    )
    out: str = opt(
        "runs/train",
        "run folder URL: checkpoint.pt, epoch-NNN.pt, metrics.jsonl, curves.png (default runs/train)",
        positional=True,
        aliases=("--out",),
    )
    cache: str | None = opt(None, "feature cache URL (fm: required; img: pass 1 from it, needs --augment center)")
    shards: str | list[str] | None = opt(
        None, "img: shard URLs, a pattern (train-{000000..000146}.tar, *.tar) or a folder with index.json"
    )
    index: str | None = opt(None, "img: shard index URL (default: index.json beside the shards)")
    backbone: str | None = opt(
        None, "img without --cache: backbone spec (default efficientnet_lite0): " + BACKBONE_HELP
    )  # + --layer
    weights: str | None = opt(None, "backbone weights (default: those the cache was made with, else 'default')")
    epochs: int | None = opt(None, "default per backbone (docs/method.md section 3)", min=1)
    lr: float | None = opt(None, "weight learning rate (biases x2); default per backbone and schedule", min=0)
    batch_size: int | None = opt(None, "global batch size (default 64)", min=1)  # split over the img workers
    weight_decay: float | None = opt(None, "SGD weight decay (default 5e-4, SPEC section 3)", min=0)
    decay_to: str | None = opt(
        None,
        "where weight decay pulls the attention: zero (SGD's, the SPEC) or start (towards the weights the run "
        "started from, e.g. CAM's rows). Default: the recipe's",
        choices=("zero", "start"),
    )
    # These four and the seed decide the run's trajectory; None: the default for a new run
    # (step, label, random, random, 0), the checkpoint's value on --resume.
    schedule: str | None = opt(None, "lr schedule (default step)", choices=("step", "onecycle"))
    target: str | None = opt(
        None, "ground-truth label (default), or the backbone's top-1 class", choices=("label", "predicted")
    )
    view: str | None = opt(None, "fm: which cached view per sample: random (default), first, or an index")
    augment: str | None = opt(
        None, "img: random crop 224 + flip (default) or centre crop", choices=("random", "center")
    )
    seed: int | None = opt(None, "default 0")
    # The attention's start: random (SPEC) | cam (the classifier's weights: untrained rows are CAM);
    # init_from: an L-CAM checkpoint URL whose attention is the start (e.g. L-CAM-Fm for L-CAM-Img).
    init: str | None = opt(
        None,
        "the attention's start: cam (row k = the classifier's weights for class k: an untrained row gives "
        "CAM's map; pooling + linear heads only), random (docs/method.md, PyTorch's default draw), or auto (cam where the head allows "
        "it, else random, e.g. VGG-16). Default: auto (random with --recipe spec)",
        choices=("auto", "random", "cam"),
    )
    init_from: str | None = opt(
        None,
        "start from this L-CAM checkpoint's attention (e.g. --method img from an L-CAM-Fm run's checkpoint.pt)",
        metavar="CHECKPOINT",
    )
    targets: str | None = opt(
        None,
        "single: one target per image (docs/method.md, default); top-k: the top-K predicted classes, each its own CE target "
        "and map (needs --target predicted)",
        choices=("single", "top-k"),
    )
    top_k: int | None = opt(None, "K for --targets top-k (default 3)", min=1)
    recipe_rule: str | None = opt(
        None,
        "defaults for lr/epochs/batch/schedule/init: data-size (default: chosen by the number of "
        "training samples, see README) or spec (docs/method.md section 3: random init, step schedule)",
        flag="--recipe",
        choices=("spec", "data-size"),
    )
    # Export only: the trained state (resume) stays as trained; see lcam/uncovered.py.
    uncovered: str | None = opt(
        None,
        "rows no training sample trained (coverage 0), in the exported checkpoint: init (default: the row "
        "it started from, e.g. CAM's; undoes weight decay), transfer (--init cam: CAM rows mapped by a ridge "
        "fit of the trained rows' changes), keep (as trained: decayed towards 0)",
        choices=("init", "transfer", "keep"),
    )
    transfer_ridge: str | None = opt(
        None,
        "--uncovered transfer: the ridge, auto (default: 5-fold cross-validation on the trained rows) "
        "or a number (multiple of the mean eigenvalue of their Gram matrix)",
        metavar="auto|FLOAT",
    )
    row_prior: float | None = opt(
        None,
        "in the exported checkpoint, pull each trained row towards its start row (e.g. CAM's) as if "
        "the start were worth N samples: a row trained by n samples points n/(n+N) of the way from its start "
        "to its trained direction; 0: as trained. Default: by the recipe (see README), 0 with --recipe spec",
        min=0,
        metavar="N",
    )
    val_shards: int | None = opt(
        None,
        "hold back the last N shards (the cache's for fm, the image shards' for img; sorted by URL) for "
        "validation: each epoch's loss on them picks best.pt, the epoch that explains held-back images best. "
        "Default: 1 in 20 of the shards when there are 20 or more, else 0 (no validation; best.pt = the last epoch)",
        min=0,
        metavar="N",
    )
    train_shards_limit: int | None = opt(
        None,
        "train on the first N shards only (after --val-shards are held back; e.g. a learning curve)",
        min=1,
        flag="--limit-shards",
        metavar="N",
    )
    keep: int = opt(
        1,
        "epoch-NNN.pt files kept: the N most recent (0: all); checkpoint.pt (the last state) and best.pt are always kept",
        min=0,
        metavar="N",
    )
    max_steps: int | None = opt(
        None, "stop after this many steps in total (a checkpoint is kept; --resume continues)", min=0
    )
    resume: bool = opt(
        False, "continue the run in --out from its checkpoint (its method, cache, shards and recipe)", kind="switch"
    )
    checkpoint_minutes: float = opt(10.0, "fm: also checkpoint mid-epoch this often (0: at epoch ends only)", min=0)
    log_every: int = opt(20, "steps per metrics.jsonl record", min=1)
    device: str = opt("auto", "fm: the device to train on", choices=("auto", "cpu", "cuda"))
    where: str = opt(
        "auto",
        "fm: local = in this process; ray = as a Ray task that asks for a GPU when the cluster has one (CPU otherwise); "
        "auto (default) = ray when there is a cluster (RAY_ADDRESS set, as in every `lcam submit` job), else local",
        choices=("auto", "local", "ray"),
    )
    threads: int | None = opt(
        None,
        "fm on CPU: torch threads (default half the cores; the rest decode the cache)",
        min=1,
        aliases=("--torch-threads",),
    )  # the other jobs' word for it
    precision: str = opt(
        "auto",
        PRECISION_HELP.replace("fp16 on a GPU without bf16", "fp32 on a GPU without bf16: no loss scaling")
        + "; L-CAM-Fm keeps fp32 under auto (only the head runs per step); fp16 is refused (no loss scaling)",
        choices=PRECISIONS,
    )
    # fm loader
    buffer_rows: int = opt(2048, "fm: rows in the loader's shuffle buffer", min=1)
    prefetch_chunks: int = opt(4, "fm: cache chunks read ahead", min=1)
    loader_threads: int = opt(2, "fm: cache reading threads", min=1)
    # img / Ray
    workers: int = opt(1, "img: Ray Train workers (one GPU each on a GPU cluster)", min=1)
    use_gpu: bool | None = opt(
        None,
        "img: auto = when the cluster has GPUs",
        choices=("auto", "yes", "no"),
        parse=use_gpu_choice,
        cli_default="auto",
    )
    cpus_per_worker: float = opt(1.0, "img: CPUs reserved per training worker", min=0)
    data_cpus: float = opt(1.0, "img: CPUs per Ray Data read/decode task", min=0)
    decode_batch_size: int = opt(16, "img: images per Ray Data decode batch", min=1)
    decoder: str = opt(DEFAULT_DECODER, "img: " + DECODER_HELP, choices=DECODERS)
    shuffle_buffer: int = opt(256, "img: rows in each worker's shuffle buffer (0: off)", min=0)
    ray_storage: str | None = opt(
        None,
        "img: Ray Train's storage URL (default: OUT/ray-train, with --storage-option; on a cluster it must be shared storage)",
    )
    storage_options: StorageOptions = storage(" for --out", "--storage-option")  # the run folder
    cache_storage_options: StorageOptions = storage(" for the cache", "--cache-storage-option")
    shard_storage_options: StorageOptions = storage(" for the shards", "--shard-storage-option")
    progress: bool = opt(True, "no progress bar or per-epoch lines", kind="negated", flag="--no-progress")

    def check(self) -> None:
        """The rules between fields that need no file (pipeline.train.setup checks the rest)."""
        if self.precision == "fp16":
            raise UserError("--precision fp16 is not offered for training (no loss scaling); use bf16, fp32 or auto")


def keep_ratios(text: str | Sequence[float]) -> tuple[float, ...]:
    """``"1,0.5,0.15"`` -> ``(1.0, 0.5, 0.15)``."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        return tuple(float(v) for v in items if str(v).strip())
    except ValueError:
        raise ValueError(f"keep ratios must be comma-separated numbers like 1,0.5,0.15, got {text!r}") from None


def method_limit_pairs(pairs: Sequence[str]) -> dict[str, int]:
    """``["scorecam=32", ...]`` -> ``{"scorecam": 32}``."""
    out: dict[str, int] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            out[name.strip()] = int(value)
        except ValueError:
            sep = ""
        if not sep:
            raise UserError(f"--method-limit {pair!r} must look like METHOD=N, e.g. scorecam=32")
    return out


def _default_methods() -> tuple[str, ...]:
    from lcam.cam_methods.base import default_methods  # the registry (torch-free), read when a config is made

    return default_methods()


@dataclass
class EvalConfig:
    """Everything ``lcam eval`` needs. None means "from the first checkpoint, else the default"."""

    shards: str | list[str] = opt(
        help="evaluation shards: a pattern (val-{000000..000049}.tar, *.tar) or a folder with index.json",
        positional=True,
    )
    out: str = opt(help="output folder URL: results.md, results.json, adic.png, per_image.csv", positional=True)
    checkpoints: list[str] = opt(
        help="an L-CAM checkpoint (repeatable): its method (fm/img) names the row unless NAME= is given",
        default_factory=list,
        kind="list",
        flag="--checkpoint",
        dest="checkpoints",
        metavar="[NAME=]URL",
    )
    methods: tuple[str, ...] = derived(
        default_factory=_default_methods, why="--methods, checked against the CAM-method registry (jobs/eval.py)"
    )
    method_options: dict[str, dict[str, Any]] = derived(
        default_factory=dict, why="one flag per registered method option, e.g. --rise-masks (jobs/eval.py)"
    )
    metrics: tuple[str, ...] = derived((), "one switch per optional registered metric, e.g. --road (jobs/eval.py)")
    metric_options: dict[str, dict[str, Any]] = derived(
        default_factory=dict, why="one flag per registered metric option, e.g. --insdel-steps (jobs/eval.py)"
    )
    backbone: str | None = opt(
        None, "default: the checkpoints' backbone, else efficientnet_lite0; " + BACKBONE_HELP
    )  # + --layer
    weights: str | None = opt(None, "default: the checkpoints' weights, else 'default'")
    # SPEC section 5's keep ratios: lcam.metrics.adic.DEFAULT_RATIOS (tests/test_options.py checks they agree; lcam.metrics imports torch)
    ratios: tuple[float, ...] = opt((1.0, 0.5, 0.15), "keep ratios", parse=keep_ratios, cli_default="1,0.5,0.15")
    limit: int | None = opt(None, "evaluate a seeded random subset of N images (the papers: 2000)", min=1)
    seed: int = opt(0, "seed of the image subset and of the method-subset ranking")
    method_limits: dict[str, int] = opt(
        help="evaluate METHOD on N of the images only (repeatable; e.g. scorecam=32 for a costly method)",
        default_factory=dict,
        kind="list",
        flag="--method-limit",
        dest="method_limits",
        metavar="METHOD=N",
        parse=method_limit_pairs,
    )
    batch_size: int = opt(16, "images per batch and per forward (default 16: fastest on CPU; raise it on a GPU)", min=1)
    costly_on_cpu: bool = opt(
        False,
        "on a CPU, also run the default list's costly methods (Score-CAM, RISE: about a thousand forwards "
        "per image each), left out there by default; --method-limit scorecam=N caps one to N images",
        kind="switch",
    )
    split_coverage: bool = opt(
        False, "also the table on images whose class row L-CAM trained (coverage > 0) and on the others", kind="switch"
    )
    save_maps: int = opt(
        0,
        "keep every method's map of the first N images (by rank) in maps.npz, for the report's gallery",
        min=0,
        metavar="N",
    )
    engine: str = opt(
        "auto",
        "local = in this process; ray = Ray Data with an actor pool; auto (default) = ray when there is a cluster "
        "(RAY_ADDRESS set), else local",
        choices=("auto", "local", "ray"),
        flag="--where",
        aliases=("--engine",),
    )
    actors: int | None = opt(None, "ray: actors (default: one per GPU, else 1)", min=1)
    decode_workers: int = opt(4, "local: decoding threads", min=1)
    torch_threads: int | None = opt(None, "ray CPU actors: torch threads (default: the node's cores)", min=1)
    device: str = opt("auto", "local engine's device", choices=("auto", "cpu", "cuda"))
    fold_batchnorm: bool = opt(
        True,
        "run the backbone as built (default: BatchNorm folded into the convolutions, same function, faster)",
        kind="negated",
        flag="--no-fold-batchnorm",
        dest="fold_batchnorm",
    )
    index: str | None = opt(None, "shard index URL (default: index.json beside the shards)")
    shard_storage_options: StorageOptions = storage(" for the shards", "--shard-storage-option")
    out_storage_options: StorageOptions = storage(" for the output folder", "--storage-option")
    checkpoint_storage_options: StorageOptions = storage(" for the checkpoints", "--checkpoint-storage-option")
    progress: bool = opt(True, "no progress bar or progress lines", kind="negated", flag="--no-progress")

    def public(self) -> dict[str, Any]:
        """The config for results.json: storage options (credentials) left out."""
        d = asdict(self)
        for k in ("shard_storage_options", "out_storage_options", "checkpoint_storage_options"):
            d.pop(k)
        return d


def no_trailing_slash(url: str) -> str:
    return url.rstrip("/")


@dataclass
class AuditConfig:
    """Everything ``lcam audit`` needs."""

    cams: str = opt(
        help="CAM store URL (made by `lcam cams`; --classes predicted,label gives the errors both maps)",
        positional=True,
    )
    out: str | None = opt(
        None,
        "output folder: audit.html, per_class.csv, confusions.csv, per_sample.parquet",
        positional=True,
        aliases=("--out",),
        parse=no_trailing_slash,
    )
    compare: str | None = opt(
        None, "an `lcam eval --save-maps N` output folder: rank correlation with its maps", metavar="EVAL_DIR"
    )
    compare_method: str = opt("gradcam", "which of the evaluation's methods to compare with (default gradcam)")
    max_thumbnails: int = opt(300, "pictures in the page, all sections together (default 300)", min=0)
    class_names: str | None = opt(None, "class names file (default ImageNet)")
    grid: int = derived(
        56, "maps are compared and measured at grid x grid (bilinear from the store's maps): a fixed protocol"
    )
    band: float = opt(BORDER_BAND, "border band width, a share of the image side (default 0.1)", min=0, max=0.5)
    top_fraction: float = derived(
        TOP_FRACTION, "a map's region for overlaps: the evaluation's smallest keep ratio, fixed"
    )
    thumb_size: int = derived(112, "the page's picture size (layout)")
    colormap: str = derived("jet", "the page's colours (layout)")
    opacity: float = derived(0.5, "the page's overlay opacity (layout)")
    storage_options: StorageOptions = storage(" for the CAM store, its source shards and --compare", "--storage-option")
    out_storage_options: StorageOptions = storage(" for the output folder", "--out-storage-option")
    progress: bool = opt(
        True,
        "no progress lines (the summary is still printed; --quiet prints nothing)",
        kind="negated",
        flag="--no-progress",
    )

    def check(self) -> None:
        if not self.out:
            raise UserError("give the output folder: lcam audit CAMS OUT (or --out OUT)")
