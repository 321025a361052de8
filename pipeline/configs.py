"""The stages' config dataclasses, each field declared once with its command-line option.

Torch-free on purpose: ``lcam <cmd> --help`` builds its options from these declarations
(``jobs/options.py``) without importing the stages, which import torch and Ray. The stage
modules re-export their config (``from pipeline.extract import ExtractConfig`` keeps working).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .options import BACKBONE_HELP, PRECISION_HELP, PRECISIONS, comma_list, derived, opt, storage

if TYPE_CHECKING:
    from .fs import StorageOptions

VIEWS = ("center", "hflip")
# Samples per decode task: a 1,000-image shard decodes on 8 CPUs at once (a GPU node of
# cluster.yaml has 8 vCPUs), while each task still amortises its start (~ms) over >100 images.
DECODE_PART_ROWS = 128


@dataclass
class ExtractConfig:
    """Everything ``lcam extract`` needs."""

    shards: str | list[str] = opt(help="shard URLs: a pattern (train-{000000..000146}.tar, *.tar) or a folder/prefix with index.json",
                                  positional=True)
    cache: str = opt(help="feature cache URL (local path, s3://, gs://)", positional=True)
    backbone: str = opt("efficientnet_lite0", BACKBONE_HELP)  # --layer folds into this spec (jobs/extract.py)
    weights: str = opt("default", "'default' (pretrained), a torchvision weight name, a checkpoint path/URL, or 'random'")
    views: tuple[str, ...] = opt(("center",), "comma-separated: center, hflip (default center)", parse=comma_list, cli_default="center")
    dtype: str = opt("float16", "how the features are stored", choices=("float16", "bfloat16", "float32"))
    batch_size: int = opt(32, "images per backbone forward", min=1, range_text="a positive number of images")
    num_actors: int | None = opt(None, "backbone actors (default: one per GPU, else 1)", flag="--actors", min=1)
    decode_batch_size: int = derived(DECODE_PART_ROWS, "images per decode task: one shard decodes in parallel parts (a tuning constant)")
    store_logits: bool = opt(False, "also store the full logits", kind="switch", flag="--logits")
    precision: str = opt("auto", PRECISION_HELP, choices=PRECISIONS)
    torch_threads: int | None = opt(None, "CPU actors: torch threads (default: all cores of the node)", min=1)
    index: str | None = opt(None, "shard index URL (default: index.json beside the shards)")
    shard_storage_options: StorageOptions = storage(" for the shards", "--shard-storage-option")
    cache_storage_options: StorageOptions = storage(" for the cache", "--cache-storage-option")
    progress: bool = opt(True, "no progress bar or progress lines", kind="negated", flag="--no-progress")
