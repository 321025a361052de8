"""The pipeline at 100x the sample on a simulated multi-node Ray cluster (issue #13, item 5).

    .venv/bin/python benchmarks/scale.py [--images 100000] [--compare 10000] [--per-shard 1000] [--workers 2]

Generates ``--images`` deterministic 64x64 JPEGs with labels (image i: a smooth colour
field from seed i, label i % 1000), then runs, per dataset size (``--compare`` first, then
``--images``), on one ``ray.cluster_utils.Cluster``:

  shards   pack_folder, 1,000 images per shard (in this process: no Ray)
  extract  lcam extract, torchvision:resnet18 with random weights at 64 px
  train    L-CAM-Fm from the cache, 1 epoch
  cams     CAMs from the cache, top-5

The cluster: a head with no CPU and no GPU (as cluster.yaml's), and ``--workers`` worker
nodes with 2 CPUs and one fake GPU each (``num_gpus=1``: model actors ask for a GPU, so Ray
places them there; they run on the CPU, torch sees no CUDA device).

Per stage it prints: images/s; the driver's CPU seconds as a share of the whole process
tree's (this process and every process it started: Ray's GCS, raylets, workers; /proc
sampled every 0.5 s, so a worker that lived < 0.5 s may be missed: the share errs high;
the sampling thread's own CPU is not counted);
feature bytes that crossed the driver; the tree's peak resident memory (the same /proc sampling); the object store's
spill. Then the peak at ``--compare`` vs ``--images`` images, ``cache verify``, and where
each stage ran from Ray's own records (``ray.util.state``: the nodes of the tasks and actors
created during the stage; none: it ran in the driver, on the head).

Feature bytes through the driver: the extraction's driver only ever receives what
``run_shard_stage`` gets back from its actors (it never ``ray.get``s a part); the stage
counts the pickled size of those results and the numpy bytes among them (``StageStats``).
The bytes a Ray Data ``iter_batches`` on the driver would receive are the cache's raw
feature bytes (what the previous design moved), printed next to it.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import local_ray_env, target  # noqa: E402

BACKBONE, WEIGHTS = "torchvision:resnet18,size=64", "random"


def make_images(folder: Path, n: int) -> None:
    """n deterministic 64x64 JPEGs (smooth colour fields) and labels.tsv (label i % 1000)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "labels.tsv", "w") as f:
        f.write("file\tclass_index\n")
        for i in range(n):
            name = f"img{i:07d}.jpg"
            if not (folder / name).exists():
                rng = np.random.default_rng(i)
                small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(small).resize((64, 64), Image.BILINEAR).save(buf, format="JPEG", quality=85)
                (folder / name).write_bytes(buf.getvalue())
            f.write(f"{name}\t{i % 1000}\n")


def _proc_table() -> dict[int, tuple[int, int, float, int]]:
    """pid -> (ppid, start ticks, CPU seconds user+system, resident bytes) from /proc."""
    tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the name: state ppid ... utime(12) stime(13) ... starttime(20), 0-based here
        # fields[21] is rss in pages
        out[int(entry)] = (
            int(fields[1]),
            int(fields[19]),
            (int(fields[11]) + int(fields[12])) / tick,
            int(fields[21]) * page,
        )
    return out


class TreeSampler:
    """CPU seconds and resident memory of this process and every descendant, sampled from
    /proc every ``interval`` s in one thread (a process that ended keeps its last CPU value).
    The thread's own CPU time is kept apart: it is the measurement's, not the driver's."""

    def __init__(self, interval: float = 0.5) -> None:
        self.me = os.getpid()
        self.last: dict[tuple[int, int], float] = {}
        self.peak = 0
        self.own_cpu = 0.0
        self.interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        t0 = time.thread_time()
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        seen, rss, stack = {}, 0, [self.me]
        while stack:
            pid = stack.pop()
            if pid in table:
                seen[(pid, table[pid][1])] = table[pid][2]
                rss += table[pid][3]
            stack.extend(children.get(pid, []))
        with self._lock:
            self.last.update(seen)
            self.peak = max(self.peak, rss)
            self.own_cpu += time.thread_time() - t0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = 0
        self.sample()

    def snapshot(self) -> tuple[float, float]:
        """(driver CPU s without the sampler's, tree CPU s without the sampler's) so far."""
        self.sample()
        with self._lock:
            total, own = sum(self.last.values()), self.own_cpu
        t = os.times()
        return t.user + t.system - own, total - own

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def spilled_mib() -> float:
    """MiB Ray spilled to disk so far (its memory summary)."""
    import ray
    from ray._private.internal_api import memory_summary

    try:
        # this cluster's address: without it Ray picks "the latest" of the machine's clusters
        text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    except Exception:  # noqa: BLE001 - a measurement, not the work
        return float("nan")
    m = re.search(r"Spilled (\d+) MiB", text)
    return float(m.group(1)) if m else 0.0


def nodes_of_stage(since_ms: int) -> set[str]:
    """Node ids of the tasks Ray ran after ``since_ms``, actor creations and actor calls
    included (its own state records: where each task's worker ran)."""
    from ray.util.state import list_tasks

    nodes = set()
    import ray

    address = ray.get_runtime_context().gcs_address
    for t in list_tasks(address=address, limit=100000, raise_on_missing_output=False, detail=True):
        start = getattr(t, "start_time_ms", None) or getattr(t, "creation_time_ms", None) or 0
        if start >= since_ms and getattr(t, "node_id", None) and t.type != "DRIVER_TASK":
            nodes.add(t.node_id)
    return nodes


class Stage:
    def __init__(self, name: str, images: int, cpu: TreeSampler) -> None:
        self.name, self.images, self.cpu = name, images, cpu

    def __enter__(self) -> "Stage":
        self.t0, self.ms0 = time.perf_counter(), int(time.time() * 1000)
        self.drv0, self.tree0 = self.cpu.snapshot()
        self.spill0 = spilled_mib()
        self.cpu.reset_peak()
        return self

    def __exit__(self, *exc) -> None:
        self.peak = self.cpu.peak
        self.seconds = time.perf_counter() - self.t0
        drv, tree = self.cpu.snapshot()
        self.driver_cpu, self.tree_cpu = drv - self.drv0, tree - self.tree0
        self.spill = spilled_mib() - self.spill0
        self.nodes = nodes_of_stage(self.ms0)

    @property
    def share(self) -> float:
        return self.driver_cpu / self.tree_cpu if self.tree_cpu > 0 else 0.0

    def line(self) -> str:
        return (
            f"{self.name:8s} {self.images / self.seconds:8.1f} images/s  {self.seconds:7.1f}s  driver CPU {self.driver_cpu:6.1f}s of {self.tree_cpu:7.1f}s "
            f"({100 * self.share:4.1f}%)  peak {self.peak / 2**30:5.2f} GiB  spilled {self.spill:.0f} MiB"
        )


def run_size(
    n: int, work: Path, images: Path, per_shard: int, head: str, workers: set[str], cpu: TreeSampler, threads: int
) -> dict:
    from pipeline.cams.run import generate_cams
    from pipeline.configs import CamsConfig, ExtractConfig, TrainConfig
    from pipeline.extract.run import extract
    from pipeline.shards.pack import pack_folder
    from pipeline.shards.read import list_shards
    from pipeline.store.feature_cache import FeatureCache
    from pipeline.train.run import train

    out = work / f"n{n}"
    folder = out / "images"
    folder.mkdir(parents=True)
    with open(images / "labels.tsv") as src, open(folder / "labels.tsv", "w") as dst:
        for i, line in enumerate(src):
            if i > n:
                break
            dst.write(line)
            if i:
                name = line.split("\t")[0]
                os.symlink(images / name, folder / name)
    print(f"\n== {n} images, {-(-n // per_shard)} shards of {per_shard}", flush=True)
    stages = []
    with Stage("shards", n, cpu) as s:
        pack_folder(folder, str(out / "shards"), samples_per_shard=per_shard, progress=False, layout="labels")
    stages.append(s)
    print(s.line(), flush=True)
    with Stage("extract", n, cpu) as s:
        summary = extract(
            ExtractConfig(
                shards=str(out / "shards"),
                cache=str(out / "cache"),
                backbone=BACKBONE,
                weights=WEIGHTS,
                batch_size=256,
                torch_threads=threads,
                progress=False,
            )
        )
    stages.append(s)
    print(s.line(), flush=True)
    stage = summary.stage
    cache = FeatureCache.open(str(out / "cache"))
    raw = len(cache) * cache.raw_bytes_per_row()
    print(
        f"         driver received {stage.result_bytes} bytes of results ({stage.result_bytes / max(1, stage.shards_done):.0f} per shard), "
        f"{stage.array_bytes} bytes of arrays; the features are {raw / 2**20:.1f} MiB raw (what iter_batches on the driver moved before)",
        flush=True,
    )
    report = cache.verify(expected={i.url: i.count for i in list_shards(str(out / "shards"))})
    with Stage("train", n, cpu) as s:
        trained = train(
            TrainConfig(
                method="fm",
                cache=str(out / "cache"),
                out=str(out / "run"),
                epochs=1,
                batch_size=256,
                target="predicted",
                progress=False,
            )
        )
    stages.append(s)
    print(s.line(), flush=True)
    with Stage("cams", n, cpu) as s:
        generate_cams(
            CamsConfig(
                checkpoint=trained.checkpoint,
                out=str(out / "cams"),
                cache=str(out / "cache"),
                classes="top-k",
                top_k=5,
                torch_threads=threads,
                progress=False,
            )
        )
    stages.append(s)
    print(s.line(), flush=True)
    for s in stages:
        where = (
            "driver (head)"
            if not s.nodes
            else ("worker nodes" if s.nodes <= workers else f"nodes incl. the head ({len(s.nodes)})")
        )
        print(f"         {s.name}: ran on {where}", flush=True)
    return {
        "n": n,
        "stages": stages,
        "summary": summary,
        "verify": report,
        "raw": raw,
        "workers": workers,
        "head": head,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument(
        "--compare",
        type=int,
        default=10_000,
        help="the smaller size whose peak memory the larger's is held to (0: none)",
    )
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="worker nodes (2 CPUs and one fake GPU each)")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch threads per model actor (default: the machine's cores / worker nodes, at least 1)",
    )
    parser.add_argument("--work", default=None, help="folder for images, shards, caches (default: a new temp folder)")
    args = parser.parse_args()

    local_ray_env()
    # the state API answers at most 10,000 records by default: one per task here (~10 a shard)
    os.environ.setdefault("RAY_MAX_LIMIT_FROM_API_SERVER", "100000")
    import ray
    from ray.cluster_utils import Cluster

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-"))
    print(
        f"work folder {work}; load {os.getloadavg()}; {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        flush=True,
    )
    t0 = time.perf_counter()
    make_images(work / "images", args.images)
    print(f"generated {args.images} JPEGs in {time.perf_counter() - t0:.0f}s", flush=True)

    cpu = TreeSampler()
    # Object stores sized as ensure_ray sizes a local one; the head holds no work.
    # the dashboard (Ray's state API reads placement through it) on a free port: another Ray
    # on this machine may hold the default 8265
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dashboard_port = sock.getsockname()[1]
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "num_gpus": 0,
            "include_dashboard": True,
            "dashboard_port": dashboard_port,
            "object_store_memory": 2**30,
        },
    )
    for _ in range(args.workers):
        cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=2**30)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    head = ray.get_runtime_context().get_node_id()
    workers = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head}
    print(f"cluster: head {head[:8]} (0 CPU, 0 GPU), workers {', '.join(w[:8] for w in sorted(workers))}", flush=True)

    sizes = (
        [s for s in (args.compare, args.images) if s] if args.compare and args.compare < args.images else [args.images]
    )
    # The simulated nodes share this machine's cores: an actor taking every core (torch's
    # default on a node) oversubscribes them, one actor per node each spinning on all cores.
    threads = args.torch_threads or max(1, (os.cpu_count() or 1) // max(1, args.workers))
    print(f"torch threads per model actor: {threads}", flush=True)
    results = [run_size(n, work, work / "images", args.per_shard, head, workers, cpu, threads) for n in sizes]
    cpu.stop()

    print()
    ok = True
    big = results[-1]
    by = {s.name: s for s in big["stages"]}
    for name, s in by.items():
        if name == "shards":
            continue  # packing runs in this process by design (`lcam shards` is a local command)
        ok &= target(f"scale_driver_cpu_share[{name}]", 100 * s.share, "<=", 5.0, "{:.1f}")
    ok &= target("scale_feature_bytes_through_driver", big["summary"].stage.array_bytes, "<=", 0, "{:.0f}")
    if len(results) > 1:
        ratio = max(s.peak for s in big["stages"]) / max(s.peak for s in results[0]["stages"])
        print(
            f"peak tree memory: {max(s.peak for s in results[0]['stages']) / 2**30:.2f} GiB at {results[0]['n']} images, "
            f"{max(s.peak for s in big['stages']) / 2**30:.2f} GiB at {big['n']}"
        )
        ok &= target("scale_peak_memory_ratio", ratio, "<=", 1.2)
    rep = big["verify"]
    exact = rep.ok and rep.rows == big["n"]  # every generated image decodes: none skipped
    print(f"cache verify: ok={rep.ok} rows={rep.rows} problems={rep.problems[:3]}")
    ok &= target("scale_cache_verify_exact", float(exact), ">=", 1.0, "{:.0f}")
    for name in ("extract", "train", "cams"):
        s = by[name]
        ok &= target(
            f"scale_placed_on_workers[{name}]", float(bool(s.nodes) and s.nodes <= workers), ">=", 1.0, "{:.0f}"
        )
    print(f"total {time.perf_counter() - t0:.0f}s; load {os.getloadavg()}")
    ray.shutdown()
    cluster.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
