"""Kubernetes renderer: manifests validate offline against the Kubernetes schemas (and the PyTorchJob CRD's),
the checked-in examples are what the renderer writes today, and the rendered pods' command really trains:
two "pods" run on this machine with the environment the manifest gives them, pod 0's DNS name -> 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from launch.k8s.__main__ import main as k8s_main

from ports import free_port
from run_outputs import checkpoint_step, step_rows, world_size_of

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "launch" / "k8s" / "examples"
PYTORCHJOB_SCHEMA = json.loads((ROOT / "launch" / "k8s" / "schemas" / "pytorchjob-v1.json").read_text())
K8S_VERSIONS = ["1.31.0", "1.37.0"]  # podFailurePolicy is GA from 1.31

BASE = ["--gpus-per-node", "8", "--image", "registry.example.com/ssl:0.1.0", "--config", "configs/debug.yaml"]
FULL = [
    *BASE,
    "--nodes", "2:4", "--name", "simclr-r50", "--namespace", "research",
    "--set", "data.train_shards=s3://bucket/shards", "--set", "checkpoint.dir=s3://bucket/runs/simclr",
    "--node-selector", "nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3", "--node-selector", "pool=train",
    "--toleration", "nvidia.com/gpu:NoSchedule", "--toleration", "dedicated=ml:NoExecute",
    "--toleration", "spot",
    "--wandb-secret", "wandb:token", "--s3-secret", "s3-credentials", "--shm-size", "128Gi",
    "--cpu", "96", "--memory", "900Gi", "--grace-period", "600", "--max-restarts", "5",
    "--env", "NCCL_SOCKET_IFNAME=eth0", "--env", "NCCL_DEBUG=WARN",
]  # fmt: skip


def render(argv: list[str]) -> tuple[str, list[dict[str, Any]]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert k8s_main(["render", *argv]) == 0
    return out.getvalue(), list(yaml.safe_load_all(out.getvalue()))


def pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "PyTorchJob":
        return [r["template"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
    return [doc["spec"]["template"]] if doc["kind"] == "Job" else []


def validate(doc: dict[str, Any], version: str) -> None:
    """Core kinds against the strict (no unknown fields) Kubernetes schemas; a PyTorchJob against the
    vendored CRD schema, with its pod templates against the core PodTemplate schema."""
    if doc["kind"] == "PyTorchJob":
        jsonschema.Draft202012Validator(PYTORCHJOB_SCHEMA).validate(doc)
        for template in pod_templates(doc):
            wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
            kubernetes_validate.validate({**wrapper, "template": template}, version, strict=True)
    else:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("kind", ["indexed-job", "pytorchjob"])
@pytest.mark.parametrize("argv", [[*BASE, "--nodes", "1"], FULL], ids=["minimal", "full"])
def test_rendered_manifests_validate(kind: str, argv: list[str], version: str) -> None:
    _, docs = render(["--kind", kind, *argv])
    assert [d["kind"] for d in docs] == (["Service", "Job"] if kind == "indexed-job" else ["PyTorchJob"])
    for doc in docs:
        validate(doc, version)


@pytest.mark.parametrize(
    ("kind", "path", "bad"),
    [
        ("indexed-job", ["spec", "template", "spec", "containers", 0], {"volumeMount": []}),  # typo
        ("indexed-job", ["spec"], {"completionMode": 3}),
        ("pytorchjob", ["spec", "pytorchReplicaSpecs", "Worker"], {"restartPolicy": "Sometimes"}),
        ("pytorchjob", ["spec", "elasticPolicy"], {"maxReplica": 4}),
        ("pytorchjob", ["spec", "pytorchReplicaSpecs", "Worker", "template", "spec"], {"nodeSelektor": {}}),
    ],
)
def test_validation_catches_broken_manifests(kind: str, path: list, bad: dict) -> None:
    """The checks above can fail: one wrong field anywhere is rejected."""
    _, docs = render(["--kind", kind, *FULL])
    doc = copy.deepcopy(docs[-1])
    node = doc
    for key in path:
        node = node[key]
    node.update(bad)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(doc, K8S_VERSIONS[-1])


def test_indexed_job_wiring() -> None:
    service, job = render(["--kind", "indexed-job", *FULL])[1]
    template = job["spec"]["template"]
    pod = template["spec"]
    (main,) = pod["containers"]
    env = {e["name"]: e for e in main["env"]}
    # pod 0 is reachable as {job}-0.{service}: the Service selects exactly this job's pods
    assert pod["subdomain"] == service["metadata"]["name"] == "simclr-r50"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    assert env["RDZV_ENDPOINT"]["value"] == "simclr-r50-0.simclr-r50:29400"
    assert {k: env[k]["value"] for k in ("NNODES", "NPROC_PER_NODE", "RDZV_ID", "MAX_RESTARTS")} == {
        "NNODES": "2:4", "NPROC_PER_NODE": "8", "RDZV_ID": "simclr-r50", "MAX_RESTARTS": "5",
    }  # fmt: skip
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    assert job["spec"]["backoffLimit"] == 5 * 4
    assert pod["restartPolicy"] == "Never"  # required by podFailurePolicy
    ignore, fail = job["spec"]["podFailurePolicy"]["rules"]
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    # launch/torchrun.sh's retryable exits replace the pod; any other (1 a crash, 2 a bad config) fails
    assert fail == {
        "action": "FailJob",
        "onExitCodes": {"containerName": main["name"], "operator": "NotIn", "values": [130, 137, 138, 143]},
    }
    _check_pod(pod, main, env)


def test_pytorchjob_wiring() -> None:
    (job,) = render(["--kind", "pytorchjob", *FULL])[1]
    elastic = job["spec"]["elasticPolicy"]
    assert (elastic["minReplicas"], elastic["maxReplicas"], elastic["maxRestarts"]) == (2, 4, 5)
    assert elastic["rdzvBackend"] == "c10d" and job["spec"]["nprocPerNode"] == "8"
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 4 and worker["restartPolicy"] == "ExitCode"
    assert job["spec"]["runPolicy"]["backoffLimit"] == 20
    pod = worker["template"]["spec"]
    (main,) = pod["containers"]
    assert main["name"] == "pytorch" and main["ports"][0]["name"] == "pytorchjob-port"
    env = {e["name"]: e for e in main["env"]}
    assert env["RDZV_ENDPOINT"]["value"] == "simclr-r50-worker-0:29400"  # the operator's replica-0 Service
    _check_pod(pod, main, env)


def _check_pod(pod: dict, main: dict, env: dict) -> None:
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert main["resources"]["requests"] == {"cpu": "96", "memory": "900Gi"}
    shm = next(v for v in pod["volumes"] if v["name"] == main["volumeMounts"][0]["name"])
    assert main["volumeMounts"][0]["mountPath"] == "/dev/shm"
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "128Gi"}
    assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "wandb", "key": "token"}
    assert main["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    assert env["NCCL_SOCKET_IFNAME"]["value"] == "eth0"
    assert pod["terminationGracePeriodSeconds"] == 600
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "pool": "train"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"},
        {"key": "spot", "operator": "Exists"},
    ]
    assert main["args"] == [
        "--config", "configs/debug.yaml", "data.train_shards=s3://bucket/shards", "checkpoint.dir=s3://bucket/runs/simclr",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nodes", "4:2"], "MIN <= MAX"),
        (["--nodes", "two"], "N or MIN:MAX"),
        (["--nodes", "2", "--name", "Bad_Name"], "--name"),
        (["--nodes", "2", "--toleration", "k=v:Sometimes"], "effect"),
        (["--nodes", "2", "--shm-size", "lots"], "--shm-size"),
        (["--nodes", "2", "--grace-period", "5"], "--grace-period"),
        (["--nodes", "2", "--set", "no_equals"], "--set"),
        # the trainer's own config check: unknown keys and bad values fail here, not in the pods
        (["--nodes", "2", "--set", "optim.lrr=0.1"], "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
        (["--nodes", "2", "--set", "optim.lr=fast"], "optim.lr must be a number"),
        (["--nodes", "2", "--config", "configs/nope.yaml"], "--config configs/nope.yaml: no such file"),
        (["--nodes", "2", "--secret-env", "TOKEN=Bad_Secret"], "--secret-env"),
    ],
)
def test_cli_rejects_bad_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert k8s_main(["render", *BASE, *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.count("\n") == 1 and captured.out == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["--env", "AWS_SECRET_ACCESS_KEY=hunter2hunter2"],
        ["--env", "HF_TOKEN=hunter2hunter2"],
        ["--env", "WANDB_API_KEY=hunter2hunter2"],
        ["--set", "data.train_shards=https://b.s3.example.com/s?X-Amz-Signature=hunter2hunter2"],
        ["--env", "PROXY=http://me:hunter2hunter2@proxy:3128"],
    ],
)
def test_credentials_are_never_written(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture):
    """A credential on the command line is refused before anything is written (the manifest would hold it
    in plain text, and its header the command line); the message names the Secret-based way instead."""
    target = tmp_path / "job.yaml"
    assert k8s_main(["render", *BASE, "--nodes", "2", *argv, "-o", str(target)]) == 2
    captured = capsys.readouterr()
    assert not target.exists() and captured.out == "" and captured.err.count("\n") == 1
    assert "hunter2" not in captured.err
    assert "Secret" in captured.err or "--secret-env" in captured.err


def test_secret_env_references_a_secret() -> None:
    secrets = ["--secret-env", "AWS_SECRET_ACCESS_KEY=s3-creds", "--secret-env", "HF_TOKEN=hf:token"]
    _, docs = render([*BASE, "--nodes", "2", *secrets])
    (main,) = docs[-1]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in main["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"] == {
        "name": "AWS_SECRET_ACCESS_KEY",
        "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}},
    }
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    for doc in docs:
        validate(doc, K8S_VERSIONS[-1])


def test_examples_are_current_and_valid() -> None:
    """Each example's first line is the command that rendered it; rendering again gives the same file."""
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert {f.name for f in files} == {"indexed-job.yaml", "pytorchjob.yaml"}
    for path in files:
        text = path.read_text()
        header = text.splitlines()[0]
        prefix = "# Rendered by: python -m launch.k8s "
        assert header.startswith(prefix), path
        rendered, docs = render(shlex.split(header.removeprefix(prefix))[1:])
        assert rendered == text, f"{path} is stale: re-run the command on its first line"
        for doc in docs:
            validate(doc, K8S_VERSIONS[-1])


def pod_command(doc: dict[str, Any], first_pod_host: str) -> tuple[list[str], dict[str, str]]:
    """What the kubelet would run in one pod of `doc`, mapped onto this checkout: the image's working
    directory is the repository root, the image's PATH holds the venv, pod 0's DNS name is loopback."""
    (template,) = pod_templates(doc)
    (main,) = template["spec"]["containers"]
    workdir = main["workingDir"]
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", "/tmp"),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    for var in main["env"]:
        if "value" in var:
            env[var["name"]] = var["value"].replace(first_pod_host, "127.0.0.1")
        else:  # Secrets do not exist here; the debug config does not use W&B or S3
            assert set(var["valueFrom"]) == {"secretKeyRef"}
    command = [c.replace(workdir, str(ROOT), 1) for c in main["command"]]
    return [*command, *main["args"]], env


STEPS = 24  # under one epoch (125 steps of 2 x 8 images): no epoch-end work between the incidents


def two_pod_argv(shards: Path, out: Path) -> list[str]:
    return [
        "--kind", "indexed-job", "--nodes", "2", "--gpus-per-node", "1", "--name", "ssl-test",
        "--image", "unused:0", "--config", "configs/debug.yaml", "--rdzv-port", str(free_port()),
        "--max-restarts", "3", "--wandb-secret", "wandb", "--env", "WANDB_MODE=disabled",
        "--env", "RESTART_BACKOFF=1",
        "--set", f"data.train_shards={shards}", "--set", f"run.output_dir={out}",
        "--set", "logging.progress_bar=false", "--set", f"train.max_steps={STEPS}",
        "--set", "data.batch_size=8", "--set", "checkpoint.every_steps=2", "--set", "run.deterministic=true",
    ]  # fmt: skip


class LocalPods:
    """The pods of one rendered Indexed Job as process trees on this machine. Like the Job controller, a
    pod's replacement runs the same command with the same environment and index (JOB_COMPLETION_INDEX)."""

    def __init__(self, job: dict[str, Any], logs: Path) -> None:
        self.cmd, self.env = pod_command(job, "ssl-test-0.ssl-test")
        self.logs = logs
        self.pods: dict[int, subprocess.Popen] = {}
        self.starts = 0

    def start(self, index: int) -> None:
        self.starts += 1
        log = (self.logs / f"pod{index}-{self.starts}.log").open("w")
        # TMPDIR: a killed launcher's temporary folder goes away with the test's
        env = {**self.env, "JOB_COMPLETION_INDEX": str(index), "TMPDIR": str(self.logs)}
        self.pods[index] = subprocess.Popen(
            self.cmd, cwd=ROOT, env=env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def kill(self, index: int) -> None:
        """SIGKILL the pod's whole process tree (torchrun starts each trainer in a session of its own)."""
        for pid in _process_tree(self.pods[index].pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.pods[index].wait()

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for _, p in sorted(self.pods.items())]

    def output(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()}" for p in sorted(self.logs.glob("pod*.log")))

    def close(self) -> None:
        for index in self.pods:
            self.kill(index)


def _process_tree(root: int) -> list[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    tree = [root]
    for pid in tree:
        tree += [child for child, parent in parents.items() if parent == pid]
    return tree


def _step_losses(out: Path) -> dict[int, list[float]]:
    """Every loss logged for each step: a step redone after a resume is logged again."""
    losses: dict[int, list[float]] = {}
    for row in step_rows(out):
        losses.setdefault(row["step"], []).append(row["loss"])
    return losses


def _wait_until(predicate: Any, pods: LocalPods, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert all(p.poll() is None for p in pods.pods.values()), pods.output()[-6000:]
        assert time.monotonic() < deadline, f"timed out\n{pods.output()[-6000:]}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted_run(sample_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The rendered Indexed Job's pod command on two local pods, pod 0's DNS name -> 127.0.0.1."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    _, (_, job) = render(two_pod_argv(sample_shards, tmp / "run"))
    pods = LocalPods(job, tmp)
    assert pods.env["RDZV_ENDPOINT"].startswith("127.0.0.1:") and pods.env["NNODES"] == "2"
    try:
        pods.start(0)
        pods.start(1)
        codes = pods.wait(timeout=240)
    finally:
        pods.close()
    assert codes == [0, 0], pods.output()[-6000:]
    return tmp / "run", pods.output()


@pytest.mark.slow
def test_rendered_indexed_job_trains_on_two_local_pods(uninterrupted_run: tuple[Path, str]) -> None:
    out, log = uninterrupted_run
    assert "--nnodes=2 --rdzv-backend=c10d" in log and "is_host=true" in log
    assert world_size_of(out) == 2  # both pods trained together
    assert checkpoint_step(out) == STEPS
    assert "resumed from" not in log and "launch/torchrun.sh restart" not in log


@pytest.mark.slow
def test_indexed_job_heals_after_a_drain_then_losing_the_rendezvous_host(
    uninterrupted_run: tuple[Path, str], sample_shards: Path, tmp_path: Path
) -> None:
    """Drain pod 1 (the kubelet's SIGTERM: every rank checkpoints, the pod exits 143) and start its
    replacement; once training is past the resume, kill pod 0's process tree (it hosts the rendezvous
    store) and replace it too. The surviving pod's launcher restarts its trainers each time, the job
    finishes on both pods, and every step's loss equals the uninterrupted run's: the same model, data
    order and RNG streams from each checkpoint on."""
    out = tmp_path / "run"
    _, (_, job) = render(two_pod_argv(sample_shards, out))
    pods = LocalPods(job, tmp_path)
    try:
        pods.start(0)
        pods.start(1)
        _wait_until(lambda: checkpoint_step(out) >= 2, pods)
        pods.pods[1].send_signal(signal.SIGTERM)
        assert pods.pods[1].wait(timeout=120) == 143, pods.output()[-6000:]
        drained_at = checkpoint_step(out)
        pods.start(1)
        _wait_until(lambda: pods.output().count("resumed from") == 1, pods)
        _wait_until(lambda: checkpoint_step(out) > drained_at, pods)
        pods.kill(0)
        pods.start(0)
        codes = pods.wait(timeout=240)
    finally:
        pods.close()
    log = pods.output()
    assert codes == [0, 0], log[-6000:]
    resumes = re.findall(r"resumed from \S+/step-(\d+) at step (\d+) \((.*)\)", log)
    assert len(resumes) == 2, log[-6000:]
    (drain_dir, drain_step, drain_why), (_, kill_step, kill_why) = resumes
    assert int(drain_dir) == int(drain_step) == drained_at and drain_why.startswith("stopped by ")
    assert drained_at < int(kill_step) < STEPS
    assert kill_why.startswith("the run before ended without a stop checkpoint")
    assert log.count("a trainer exited 138 (a rank on another node was stopped or lost); starting again") == 2

    expected, got = _step_losses(uninterrupted_run[0]), _step_losses(out)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step, losses in got.items():
        for loss in losses:
            assert abs(loss - expected[step][0]) <= 1e-5, (step, losses, expected[step])
    assert checkpoint_step(out) == STEPS
