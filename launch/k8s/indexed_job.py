"""Indexed Job + headless Service: multi-node training with nothing installed in the cluster.

Pod `i` of an Indexed Job whose `subdomain` names a headless Service gets the stable DNS name
`{job}-{i}.{service}`; every pod's torchrun meets at pod 0's, which survives pod 0 being replaced.
"""

from __future__ import annotations

from typing import Any

from launch.k8s.pod import container, labels, pod_spec, rendezvous_env
from launch.k8s.spec import LaunchSpec

DISRUPTED = {"type": "DisruptionTarget", "status": "True"}  # the pod was preempted, evicted or drained
CONTAINER = "trainer"
# launch/torchrun.sh's retryable exits (SIGINT, SIGKILL, past its restart budget, SIGTERM) replace the
# pod and count against backoffLimit; any other exit fails the Job
RETRYABLE = [130, 137, 138, 143]


def first_pod_host(spec: LaunchSpec) -> str:
    return f"{spec.name}-0.{spec.name}"


def render_service(spec: LaunchSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": labels(spec)},
        "spec": {
            "clusterIP": "None",
            "selector": {"app.kubernetes.io/instance": spec.name},
            # pods must resolve each other while they start, before any readiness
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rdzv", "port": spec.rdzv_port, "targetPort": spec.rdzv_port}],
        },
    }


def render_job(spec: LaunchSpec) -> dict[str, Any]:
    main = container(spec, CONTAINER, rendezvous_env(spec, first_pod_host(spec)), "rdzv")
    template_spec = {"subdomain": spec.name, "restartPolicy": "Never", **pod_spec(spec, main)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": labels(spec)},
        "spec": {
            "completionMode": "Indexed",
            "completions": spec.max_nodes,
            "parallelism": spec.max_nodes,
            # launch/torchrun.sh restarts the trainers inside the surviving pods; a pod fails (and is
            # replaced, after the Job's exponential back-off) only past that budget or when killed
            "backoffLimit": spec.max_restarts * spec.max_nodes,
            "podFailurePolicy": {
                "rules": [
                    # preemption, eviction, a drain or a lost node: replace the pod, spend no budget
                    {"action": "Ignore", "onPodConditions": [DISRUPTED]},
                    # a bad config (2) or a crash (1) fails again on any node: fail the Job at once
                    {
                        "action": "FailJob",
                        "onExitCodes": {"containerName": CONTAINER, "operator": "NotIn", "values": RETRYABLE},
                    },
                ]
            },
            "template": {"metadata": {"labels": labels(spec)}, "spec": template_spec},
        },
    }


def render(spec: LaunchSpec) -> list[dict[str, Any]]:
    """The headless Service first, so pod DNS names exist when the Job's pods start."""
    return [render_service(spec), render_job(spec)]
