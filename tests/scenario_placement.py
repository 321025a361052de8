"""Placement on a real multi-node Ray cluster on one machine (``ray.cluster_utils.Cluster``).

Run by tests/test_placement.py in a subprocess (a process can join only one Ray cluster):

    python tests/scenario_placement.py CACHE CHECKPOINT WORKDIR

starts a head with CPUs but no GPU and one worker node with a fake GPU, joins it (no
RAY_ADDRESS: ``where`` auto must see the multi-node cluster by itself), trains L-CAM-Fm
from CACHE and makes CAMs from CACHE with CHECKPOINT, and prints one JSON line with the
node ids: the head's, the worker's, and where the training task and the CAM actors ran.
"""

from __future__ import annotations

import json
import os
import sys


def placement(cache: str, checkpoint: str, workdir: str) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.cams import CamsConfig, generate_cams
    from pipeline.training import TrainConfig, train

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1, num_gpus=1)  # fake GPU: torch sees none, so the task trains on its CPU
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    result: dict = {"head": cluster.head_node.node_id, "worker": worker.node_id, "error": None}
    try:
        t = train(TrainConfig(method="fm", out=os.path.join(workdir, "fm"), cache=cache, epochs=2, batch_size=4, target="label",
                              view="first", seed=5, checkpoint_minutes=0, threads=1, progress=False))
        result.update(train_ran_on=t.ran_on, train_steps=t.steps)
        c = generate_cams(CamsConfig(checkpoint=checkpoint, out=os.path.join(workdir, "cams"), cache=cache, progress=False))
        result.update(cams_ran_on=c.ran_on, cams_samples=c.samples)
    except BaseException as exc:  # reported in the JSON line
        result["error"] = f"{type(exc).__name__}: {exc}"
    ray.shutdown()
    cluster.shutdown()
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(placement(*sys.argv[1:])), flush=True)
