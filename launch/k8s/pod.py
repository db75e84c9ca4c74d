"""The pod both job kinds run: the image's entrypoint starts torchrun from environment variables."""

from __future__ import annotations

from typing import Any

from launch.k8s.spec import LaunchSpec

SHM_VOLUME = "dshm"


def labels(spec: LaunchSpec) -> dict[str, str]:
    """`instance` selects this job's pods (the headless Service uses it); `name` is the application."""
    return {"app.kubernetes.io/name": "contrastive-pipeline", "app.kubernetes.io/instance": spec.name}


def rendezvous_env(spec: LaunchSpec, first_pod_host: str) -> dict[str, str]:
    """What launch/torchrun.sh reads: every pod meets at `first_pod_host`, a name that survives restarts."""
    return {
        "NNODES": spec.nnodes,
        "NPROC_PER_NODE": str(spec.nproc_per_node),
        "RDZV_ENDPOINT": f"{first_pod_host}:{spec.rdzv_port}",
        "RDZV_ID": spec.name,
        "MAX_RESTARTS": str(spec.max_restarts),
    }


def container(spec: LaunchSpec, name: str, env: dict[str, str], port_name: str) -> dict[str, Any]:
    """The trainer container; `--env` entries override the rendezvous variables of the same name."""
    variables: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in {**env, **dict(spec.env)}.items()]
    secrets = list(spec.secret_env)
    if spec.wandb_secret:
        secrets.insert(0, ("WANDB_API_KEY", spec.wandb_secret, spec.wandb_secret_key))
    for variable, secret, key in secrets:
        ref = {"name": secret, "key": key}
        variables.append({"name": variable, "valueFrom": {"secretKeyRef": ref}})
    limits: dict[str, str] = {}
    if spec.gpus_per_node:
        limits[spec.gpu_resource] = str(spec.gpus_per_node)
    requests = {k: v for k, v in (("cpu", spec.cpu), ("memory", spec.memory)) if v is not None}
    if spec.memory is not None:
        limits["memory"] = spec.memory  # limit = request: never evicted for memory it was promised
    out: dict[str, Any] = {
        "name": name,
        "image": spec.image,
        "command": [f"{spec.workdir}/launch/entrypoint.sh"],
        "args": ["--config", spec.config, *spec.overrides],
        "workingDir": spec.workdir,
        "env": variables,
    }
    if spec.s3_secret:
        out["envFrom"] = [{"secretRef": {"name": spec.s3_secret}}]
    out["ports"] = [{"name": port_name, "containerPort": spec.rdzv_port, "protocol": "TCP"}]
    out["resources"] = {"limits": limits, **({"requests": requests} if requests else {})}
    out["volumeMounts"] = [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}]
    return out


def pod_spec(spec: LaunchSpec, main: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        # SIGTERM reaches the trainers (launch/torchrun.sh), which checkpoint and exit inside this window
        "terminationGracePeriodSeconds": spec.grace_period_s,
        "securityContext": {"runAsNonRoot": True},
        "containers": [main],
        # DataLoader workers and NCCL share tensors through /dev/shm; the runtime's default is 64 MiB
        "volumes": [{"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}],
    }
    if spec.node_selector:
        out["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        out["tolerations"] = [t.to_k8s() for t in spec.tolerations]
    return out
