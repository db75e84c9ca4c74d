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
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from launch.k8s.__main__ import main as k8s_main

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
    assert job["spec"]["podFailurePolicy"]["rules"][0]["onPodConditions"][0]["type"] == "DisruptionTarget"
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
    ],
)
def test_cli_rejects_bad_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert k8s_main(["render", *BASE, *argv]) == 2
    assert message in capsys.readouterr().err


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.mark.slow
def test_rendered_indexed_job_trains_on_two_local_pods(sample_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = [
        "--kind", "indexed-job", "--nodes", "2", "--gpus-per-node", "1", "--name", "ssl-test",
        "--image", "unused:0", "--config", "configs/debug.yaml", "--rdzv-port", str(_free_port()),
        "--max-restarts", "0", "--wandb-secret", "wandb", "--env", "WANDB_MODE=disabled",
        "--set", f"data.train_shards={sample_shards}", "--set", f"run.output_dir={out}",
        "--set", "logging.progress_bar=false", "--set", "train.max_steps=2",
    ]  # fmt: skip
    _, (_, job) = render(argv)
    cmd, env = pod_command(job, "ssl-test-0.ssl-test")
    assert env["RDZV_ENDPOINT"].startswith("127.0.0.1:") and env["NNODES"] == "2"
    pods = [
        subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # a process group per pod: a failed test leaves no trainer behind
        )
        for _ in range(2)
    ]  # fmt: skip
    try:
        logs = [pod.communicate(timeout=240)[0] for pod in pods]
    finally:
        for pod in pods:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pod.pid, signal.SIGKILL)
    assert [p.returncode for p in pods] == [0, 0], "\n".join(log[-4000:] for log in logs)
    assert "--nnodes=2 --rdzv-backend=c10d" in logs[0]
    row = next(r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r)
    assert round(row["images_per_s"] / row["images_per_s_per_gpu"]) == 2  # both pods trained together
    assert (out / "checkpoints" / "latest").is_file()
