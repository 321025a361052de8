"""Placement on a real multi-node Ray cluster on one machine (``ray.cluster_utils.Cluster``).

Run by tests/test_placement.py in a subprocess (a process can join only one Ray cluster):

    python tests/scenario_placement.py CACHE CHECKPOINT WORKDIR

starts a head with a CPU but no GPU and one worker node with two fake GPUs, and joins it
without RAY_ADDRESS (``where`` auto must see the multi-node cluster by itself). From
CACHE it trains L-CAM-Fm in this process (``where`` local) and with ``auto``, and makes
CAMs with CHECKPOINT both ways (then once more: a resume), all under WORKDIR; it prints
one JSON line with the node ids (the head's, the worker's, where the training task and
the CAM actors ran), the summaries' counts, the progress lines relayed from the task and
the message of a user error raised inside it.
The test compares the files.
"""

from __future__ import annotations

import json
import logging
import os
import sys


def placement(cache: str, checkpoint: str, workdir: str) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.cams.run import generate_cams
    from pipeline.configs import CamsConfig, TrainConfig
    from pipeline.errors import UserError
    from pipeline.train.run import train

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2, num_gpus=2)  # fake GPUs: torch sees none, so the model runs on the node's CPU
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    result: dict = {"head": cluster.head_node.node_id, "worker": worker.node_id, "error": None}
    relayed: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            relayed.append(record.getMessage())

    logging.getLogger("lcam.remote").addHandler(Keep())

    def fm(where: str):
        return train(
            TrainConfig(
                method="fm",
                out=os.path.join(workdir, f"fm-{where}"),
                cache=cache,
                epochs=2,
                batch_size=4,
                target="label",
                view="first",
                seed=5,
                log_every=1,
                checkpoint_minutes=0,
                threads=1,
                where=where,
                progress=where == "auto",
            )
        )

    def cams(where: str):
        return generate_cams(
            CamsConfig(
                checkpoint=checkpoint,
                out=os.path.join(workdir, f"cams-{where}"),
                cache=cache,
                classes="top-k",
                top_k=2,
                upsample=True,
                where=where,
                progress=False,
            )
        )

    try:
        here, there = fm("local"), fm("auto")
        result["train"] = {"local": [here.ran_on, here.steps], "auto": [there.ran_on, there.steps]}
        here, there, again = cams("local"), cams("auto"), cams("auto")
        result["cams"] = {
            "local": [here.ran_on, here.samples],
            "auto": [there.ran_on, there.samples],
            "again": again.shards_written,
        }
        try:  # a user's mistake found inside the task comes back as the same one-line UserError
            train(
                TrainConfig(
                    method="fm",
                    out=os.path.join(workdir, "fm-bad"),
                    cache=os.path.join(workdir, "no-cache"),
                    progress=False,
                )
            )
        except UserError as exc:
            result["user_error"] = str(exc)
    except BaseException as exc:  # reported in the JSON line
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["relayed"] = relayed
    ray.shutdown()
    cluster.shutdown()
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(placement(*sys.argv[1:])), flush=True)
