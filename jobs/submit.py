"""``lcam submit`` and ``lcam jobs``: Ray jobs on a cluster through ``JobSubmissionClient``.

``lcam submit JOB --address http://HEAD:8265 --config FILE [key=value ...]`` ships the
current directory as the job's working directory (Ray honours ``.gitignore``; a
``module.path:factory`` backbone of yours travels with it) and this project's packages
beside it (when the current directory is not this checkout), runs
``python -m jobs.JOB --config ...`` on the cluster, follows the logs and exits with the
job's status. The config travels inside the job's runtime environment, so it may live
anywhere on the submitting machine; credentials never travel: the cluster uses its
instance role or its own environment.

The job's driver (``python -m jobs.JOB``) reserves nothing by default: on ``cluster.yaml``
it runs on the CPU-only head and every stage places its model work on the workers
(Ray Data actors, Ray Train workers, the Ray tasks of :mod:`pipeline.placement`). A
config may reserve resources for the driver itself where a stage truly needs them there
(``entrypoint_num_cpus``, ``entrypoint_num_gpus``, ``entrypoint_resources``: Ray then
starts the driver on a node that has them); they are checked, with the rest of the
config against the job's options, before anything is submitted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from pipeline.errors import UserError

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_NAMES = ("shards", "extract", "cache", "train", "cams", "eval", "audit", "report", "pipeline")  # every stage
CONFIG_ENV = "LCAM_JOB_CONFIG"
OWN_CONFIG = True
SECRET_WORDS = ("secret", "password", "token", "credential", "key_id", "private_key")
ENTRYPOINT_FIELDS = ("entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_resources")


def add_command_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    default_address = (
        os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    )
    if name == "submit":
        parser.add_argument("job", choices=JOB_NAMES, help="which job to run on the cluster")
        parser.add_argument(
            "--address",
            default=default_address,
            help="the head's dashboard address (default: RAY_ADDRESS or http://127.0.0.1:8265)",
        )
        parser.add_argument("--config", dest="job_config", required=True, metavar="FILE", help="the job's YAML config")
        parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the config's fields")
        parser.add_argument(
            "--no-wait", action="store_true", help="submit and return the job id without following the logs"
        )
        parser.add_argument("--submission-id", default=None)
    else:
        parser.add_argument("action", choices=("list", "logs", "stop", "status"))
        parser.add_argument("job_id", nargs="?", help="submission id (logs, stop, status)")
        parser.add_argument("--address", default=default_address)
        parser.add_argument("--follow", action="store_true", help="logs: follow until the job ends")


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # connection refused, wrong port, not a Ray dashboard
        raise UserError(
            f"cannot reach the Ray dashboard at {address} ({type(exc).__name__}: {str(exc).splitlines()[0]}); is the head up (ray up / ray start --head)?"
        ) from None


def check_no_secrets(config: dict, path: str = "") -> None:
    """Refuse credentials in a config that is about to travel to a cluster (and its logs)."""
    for key, value in config.items():
        where = f"{path}{key}"
        if isinstance(value, dict):
            check_no_secrets(value, where + ".")
        elif any(w in str(key).lower() for w in SECRET_WORDS) or str(key).lower() in ("key", "secret", "token"):
            raise UserError(
                f"config field {where!r} looks like a credential; credentials are never shipped with a job. "
                "Give the cluster an instance role (cluster.yaml) or set AWS_*/GOOGLE_* variables in its environment."
            )


def _amount(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise UserError(f"{where} must be a number >= 0, got {value!r}")
    if value > 1 and value != int(value):  # Ray's rule: fractions of a resource only below one unit
        raise UserError(f"{where} above 1 must be a whole number, got {value!r}")
    return value


def entrypoint_options(config: dict, source: str) -> dict:
    """Take the entrypoint resource fields out of a job config (they are ``lcam submit``'s,
    not the job's) and check them: ``submit_job``'s keyword arguments."""
    out: dict = {}
    for key in list(config):
        name = str(key).replace("-", "_")
        if name not in ENTRYPOINT_FIELDS:
            continue
        value = config.pop(key)
        where = f"{source}: field {key!r}"
        if name != "entrypoint_resources":
            out[name] = _amount(value, where)
            continue
        if not isinstance(value, dict) or not value:
            raise UserError(
                f'{where} must map custom resource names to amounts, e.g. {{"accelerator_type:A10G": 0.01}}, got {value!r}'
            )
        reserved = sorted({"CPU", "GPU", "memory"} & set(map(str, value)))
        if reserved:
            raise UserError(
                f"{where}: {', '.join(reserved)} cannot be given here; use entrypoint_num_cpus / entrypoint_num_gpus"
            )
        out[name] = {str(k): _amount(v, f"{where}[{k!r}]") for k, v in value.items()}
    return out


PACKAGES = ("lcam", "pipeline", "jobs")


def shipped_files(cwd: str) -> dict:
    """The runtime environment's files: the user's working directory (their own backbone
    factories, configs, class-name files) and, when that is not this checkout, this
    project's packages as ``py_modules`` so that ``python -m jobs.JOB`` imports there."""
    env: dict = {"working_dir": cwd, "excludes": [".venv", "runs", ".git", "*.egg-info", "__pycache__"]}
    if os.path.realpath(cwd) != os.path.realpath(PROJECT_ROOT):
        env["py_modules"] = [os.path.join(PROJECT_ROOT, p) for p in PACKAGES]
    return env


def submit(args: argparse.Namespace) -> int:
    from jobs.cli import command_parser
    from jobs.config import namespace_from_config, parse_overrides, read_config

    config = read_config(args.job_config)
    config.update(parse_overrides(args.overrides))
    check_no_secrets(config)
    resources = entrypoint_options(config, args.job_config)
    # the job's own fields, as the job will read them: a typo fails here, not on the cluster
    namespace_from_config(command_parser(args.job), config, args.job_config)
    import yaml

    client = _client(args.address)
    entrypoint = f"python -m jobs.{args.job} --config env:{CONFIG_ENV}"
    runtime_env = shipped_files(os.getcwd())
    runtime_env["env_vars"] = {CONFIG_ENV: yaml.safe_dump(config, sort_keys=True)}
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env=runtime_env,
        submission_id=args.submission_id,
        metadata={"lcam_job": args.job},
        **resources,
    )
    reserved = ", ".join(f"{k.removeprefix('entrypoint_')} {v}" for k, v in resources.items())
    print(
        f"submitted {args.job} as {job_id} to {args.address}"
        + (f" (its driver reserves {reserved})" if reserved else ""),
        flush=True,
    )
    if args.no_wait:
        return 0
    return follow(client, job_id)


def follow(client, job_id: str) -> int:
    """Stream the job's logs until it ends; exit status 0 only for SUCCEEDED."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except Exception:  # log streaming is best effort; the status below is what counts
        pass
    status = _wait_terminal(client, job_id)
    print(f"job {job_id}: {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


def _wait_terminal(client, job_id: str, timeout: float = 3600) -> str:
    deadline = time.time() + timeout
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if status in ("SUCCEEDED", "FAILED", "STOPPED") or time.time() > deadline:
            return status
        time.sleep(1.0)


def manage(args: argparse.Namespace) -> int:
    client = _client(args.address)
    if args.action == "list":
        for job in sorted(client.list_jobs(), key=lambda j: j.start_time or 0):
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((job.start_time or 0) / 1000))
            print(f"{job.submission_id or job.job_id}\t{str(job.status).split('.')[-1]}\t{started}\t{job.entrypoint}")
        return 0
    if not args.job_id:
        raise UserError(f"lcam jobs {args.action} needs a job id (see `lcam jobs list`)")
    if args.action == "logs":
        if args.follow:
            return follow(client, args.job_id)
        print(client.get_job_logs(args.job_id), end="")
        return 0
    if args.action == "status":
        print(str(client.get_job_status(args.job_id)).split(".")[-1])
        return 0
    stopped = client.stop_job(args.job_id)
    print(f"job {args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


def run(args: argparse.Namespace) -> int:
    return submit(args) if args.command == "submit" else manage(args)


if __name__ == "__main__":
    from jobs.cli import run_job

    sys.exit(run_job(sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] == "jobs" else "submit", sys.argv[1:]))
