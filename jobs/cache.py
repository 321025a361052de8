"""``lcam cache info URL``, ``lcam cache verify URL [--index INDEX_URL]`` and ``lcam cache repair URL``.

URL is a feature cache (``lcam extract``) or a CAM store (``lcam cams``): the store's own
format decides which, so every action works on both."""

from __future__ import annotations

import argparse
import json
from typing import Any

from jobs.common import add_storage_options, parse_storage_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    info = sub.add_parser("info", help="identity, samples, shards, size on disk, compression ratio")
    verify = sub.add_parser("verify", help="check every shard, key and feature value; exit 1 on problems")
    repair = sub.add_parser(
        "repair", help="verify, then forget damaged shards so the next `lcam extract` re-makes them"
    )
    for p in (info, verify, repair):
        p.add_argument("url", help="feature cache or CAM store URL (local path, s3://, gs://)")
        p.add_argument(
            "--index",
            default=None,
            help="shard index (index.json, or the folder holding it): expected shards and counts",
        )
        p.add_argument("--json", action="store_true", help="print JSON instead of text")
        add_storage_options(p, what=" for the cache")
        add_storage_options(p, "--index-storage-option", "index_storage_option", " for the index")
    for p in (verify, repair):
        p.add_argument("--workers", type=int, default=4, help="shards checked in parallel (memory: one chunk each)")


def expected_from_index(index_url: str, manifest_sources: list[str], storage_options: Any = None) -> dict[str, int]:
    """{source URL -> count} from a shard index, keyed like the cache's manifest.

    Index entries name shards relative to the index's folder. When the cache was built
    from another spelling of that folder (relative path, trailing slash), match by file
    name, but only where names are unique in the manifest.
    """
    from pipeline.errors import UserError
    from pipeline.fs import join, read_json

    url = index_url if index_url.endswith(".json") else join(index_url, "index.json")
    index = read_json(url, storage_options)
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise UserError(f"{url}: no shard index there (expected a JSON object with a 'shards' list of {{name, count}})")
    root = url.rsplit("/", 1)[0] if "/" in url else "."
    by_name: dict[str, list[str]] = {}
    for src in manifest_sources:
        by_name.setdefault(src.rsplit("/", 1)[-1], []).append(src)
    out: dict[str, int] = {}
    for e in index["shards"]:
        src = join(root, e["name"])
        if src not in manifest_sources and len(by_name.get(e["name"], [])) == 1:
            src = by_name[e["name"]][0]
        out[src] = int(e["count"])
    return out


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def is_cam_store(url: str, options: Any) -> bool:
    """Whether ``url`` holds a CAM store (its root's format attribute), not a feature cache."""
    from pipeline.fs import join, read_json
    from pipeline.store.cam_store import FORMAT as CAM_FORMAT

    return ((read_json(join(url, "zarr.json"), options) or {}).get("attributes") or {}).get("format") == CAM_FORMAT


def run_on_cam_store(args: argparse.Namespace, options: Any) -> int:
    """``info`` and ``verify`` of a CAM store (``lcam cams info`` prints the same info)."""
    from jobs.cams import info_lines
    from pipeline.store.cam_store import CamStore

    store = CamStore.open(args.url, options)
    if args.action == "info":
        info = store.info()
        print(json.dumps(info, indent=1, sort_keys=True) if args.json else "\n".join(info_lines(info)))
        return 0
    report = store.check_done_shards()
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        for p in report.problems:
            print(f"PROBLEM  {p}")
        status = (
            "OK"
            if report.ok
            else f"{len(report.problems)} problem(s); `lcam cache repair {store.url}` then re-run `lcam cams`"
        )
        print(f"verify {store.url}: {status} ({report.shards} shards, {report.rows} rows)")
    return 0 if report.ok else 1


def run(args: argparse.Namespace) -> int:
    from pipeline.store.feature_cache import FeatureCache
    from pipeline.store.manifest import LEGACY_MANIFEST, MANIFEST

    options = parse_storage_options(args.storage_option)
    cam_store = is_cam_store(args.url, options)
    if args.action == "repair":
        from pipeline.store.cam_store import CamStore

        store = (CamStore if cam_store else FeatureCache).open_for_repair(args.url, options)
        report, forgotten = store.repair(workers=args.workers)
        for n in report.notes:
            if n.startswith((f"{MANIFEST} rebuilt", f"{LEGACY_MANIFEST} moved")):
                print(f"rebuilt  {n}")
        for p in report.problems:
            print(f"PROBLEM  {p}")
        for url in forgotten:
            print(f"forgot   {url}")
        if forgotten or store.failed():
            print(f"re-make them: {store.repair_hint('SHARDS').split(', then ', 1)[-1]}")
        print(
            f"repair {store.url}: {len(forgotten)} damaged shard(s) forgotten, {len(store.failed())} failed shard(s) to retry"
        )
        return 0

    if cam_store:
        return run_on_cam_store(args, options)
    cache = FeatureCache.open(args.url, storage_options=options)
    expected = None
    if args.index:
        expected = expected_from_index(
            args.index, sorted(cache.done_sources()), parse_storage_options(args.index_storage_option)
        )

    if args.action == "info":
        info = cache.info(sorted(expected) if expected is not None else None)
        if args.json:
            print(json.dumps(info, indent=1, sort_keys=True))
            return 0
        ident = info["identity"]
        lines = [
            f"cache        {info['url']}",
            f"fingerprint  {info['fingerprint']}",
            f"backbone     {info['backbone']} (weights {ident.get('weights')}, digest {str(ident.get('weights_digest', ''))[:12]})",
            f"features     {info['dtype']} {tuple(info['feature_shape'])} x views {info['views']}, chunks of {info['chunk_rows']} rows",
            f"samples      {info['samples']} in {info['shards_done']} shards ({info['skipped']} skipped at extraction)",
            f"size         {_size(info['bytes_on_disk'])} on disk, {_size(info['raw_bytes'])} raw, compression ratio {info['compression_ratio']:.2f}",
            f"checksum     {info['chunk_checksum'] or 'none (made before chunk checksums)'} per chunk",
            "versions     " + ", ".join(f"{k} {v}" for k, v in sorted(info["versions"].items())),
            f"updated      {info['updated']} (created {info['created']})",
        ]
        if not info["manifest_found"]:
            lines.append(
                f"PROBLEM      the manifest ({MANIFEST}) is missing: no shard counts as done; re-run the extraction (`lcam cache verify` for details)"
            )
        for url, f in sorted(info["failed"].items()):
            lines.append(
                f"FAILED       {url}: {f.get('reason')} (at {f.get('at')}); a re-run of the extraction retries it"
            )
        for url, what in sorted(info["damaged"].items()):
            lines.append(f"DAMAGED      {url}: {what}; `lcam cache repair {info['url']}` then re-run the extraction")
        if "shards_missing" in info:
            missing = info["shards_missing"]
            lines.append(
                f"missing      {len(missing)} of {info['shards_expected']} expected shards" + (":" if missing else "")
            )
            lines += [f"  {m}" for m in missing[:20]] + (
                [f"  ... and {len(missing) - 20} more"] if len(missing) > 20 else []
            )
        print("\n".join(lines))
        return 0

    report = cache.verify(expected, workers=args.workers)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        for p in report.problems:
            print(f"PROBLEM  {p}")
        for n in report.notes:
            print(f"note     {n}")
        status = "OK" if report.ok else f"{len(report.problems)} problem(s)"
        print(
            f"verify {cache.url}: {status} ({report.shards} shards, {report.rows} rows, {report.chunks_read} chunks read)"
        )
    return 0 if report.ok else 1


if __name__ == "__main__":  # `lcam submit cache` runs `python -m jobs.cache --config ...` on the cluster
    import sys

    from jobs.cli import run_job

    sys.exit(run_job("cache", sys.argv[1:]))
