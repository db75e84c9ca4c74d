"""Indexed Job + headless Service: multi-node training with nothing installed in the cluster.

Pod `i` of an Indexed Job whose `subdomain` names a headless Service gets the stable DNS name
`{job}-{i}.{service}`; every pod's torchrun meets at pod 0's, which survives pod 0 being replaced.
"""

from __future__ import annotations

from typing import Any

from launch.k8s.pod import container, labels, pod_spec, rendezvous_env
from launch.k8s.spec import LaunchSpec

DISRUPTED = {"type": "DisruptionTarget", "status": "True"}  # the pod was preempted, evicted or drained


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
    main = container(spec, "trainer", rendezvous_env(spec, first_pod_host(spec)), "rdzv")
    template_spec = {"subdomain": spec.name, "restartPolicy": "Never", **pod_spec(spec, main)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": labels(spec)},
        "spec": {
            "completionMode": "Indexed",
            "completions": spec.max_nodes,
            "parallelism": spec.max_nodes,
            # torchrun restarts the trainers inside a pod; a lost pod 0 (the rendezvous store) fails every
            # pod at once, so each of max_restarts incidents may cost up to max_nodes pod failures
            "backoffLimit": spec.max_restarts * spec.max_nodes,
            # preemption, eviction and node drains replace the pod without spending that budget
            "podFailurePolicy": {"rules": [{"action": "Ignore", "onPodConditions": [DISRUPTED]}]},
            "template": {"metadata": {"labels": labels(spec)}, "spec": template_spec},
        },
    }


def render(spec: LaunchSpec) -> list[dict[str, Any]]:
    """The headless Service first, so pod DNS names exist when the Job's pods start."""
    return [render_service(spec), render_job(spec)]
