"""Failure scenarios on a real multi-node Ray cluster on one machine (``ray.cluster_utils.Cluster``).

Run by tests/test_cluster.py in a subprocess (a process can join only one Ray cluster):

    python tests/scenario_cluster.py node-loss SHARDS CACHE

starts a head and two worker nodes with fake GPU resources, extracts SHARDS into CACHE
with one backbone actor per (fake) GPU, removes a worker node once the first shards are
cached, lets the extraction finish, and prints one JSON line with what happened.
"""

from __future__ import annotations

import json
import sys
import threading
import time


def node_loss(shards: str, cache_url: str) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.configs import ExtractConfig
    from pipeline.extract.run import extract
    from pipeline.fs import read_json

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    result: dict = {"nodes_before": len([n for n in ray.nodes() if n["Alive"]])}
    box: dict = {}

    def run() -> None:
        try:
            box["summary"] = extract(ExtractConfig(shards=shards, cache=cache_url, batch_size=2, progress=False))
        except BaseException as exc:  # reported in the JSON line
            box["error"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 300
    while time.time() < deadline and thread.is_alive():
        doc = read_json(f"{cache_url}/manifest/zarr.json", default={}) or {}  # the manifest group's document
        done = len(doc.get("attributes", {}).get("shards", {}))
        if done >= 1:
            cluster.remove_node(workers[0], allow_graceful=False)
            result["removed_after_shards"] = done
            break
        time.sleep(0.05)
    thread.join(timeout=600)
    result["nodes_after"] = len([n for n in ray.nodes() if n["Alive"]])
    if "summary" in box:
        s = box["summary"]
        result.update(images=s.images, shards_extracted=s.shards_extracted, failed_shards=s.failed_shards)
    result["error"] = box.get("error")
    ray.shutdown()
    cluster.shutdown()
    return result


if __name__ == "__main__":
    scenario, *rest = sys.argv[1:]
    out = {"node-loss": node_loss}[scenario](*rest)
    print("RESULT " + json.dumps(out), flush=True)
