"""Kubeflow training-operator PyTorchJob: the same pod, with the operator managing pods and services.

Elastic jobs use only `Worker` replicas; the operator gives replica 0 the headless Service
`{job}-worker-0`, the rendezvous host. `restartPolicy: ExitCode` recreates a pod whose exit code the
operator deems retryable (130, 137, 143: a signal; 138: launch/torchrun.sh past its restart budget) and
fails the job on any other (1 a crash, 2 a bad config).
"""

from __future__ import annotations

from typing import Any

from launch.k8s.pod import container, labels, pod_spec, rendezvous_env
from launch.k8s.spec import LaunchSpec

API_VERSION = "kubeflow.org/v1"


def first_pod_host(spec: LaunchSpec) -> str:
    return f"{spec.name}-worker-0"


def render(spec: LaunchSpec) -> list[dict[str, Any]]:
    # the operator requires the container to be named `pytorch` and its port `pytorchjob-port`
    main = container(spec, "pytorch", rendezvous_env(spec, first_pod_host(spec)), "pytorchjob-port")
    job = {
        "apiVersion": API_VERSION,
        "kind": "PyTorchJob",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": labels(spec)},
        "spec": {
            "elasticPolicy": {
                "rdzvBackend": "c10d",
                "rdzvPort": spec.rdzv_port,
                "rdzvId": spec.name,
                "minReplicas": spec.min_nodes,
                "maxReplicas": spec.max_nodes,
                "maxRestarts": spec.max_restarts,
            },
            "nprocPerNode": str(spec.nproc_per_node),
            "runPolicy": {"backoffLimit": spec.max_restarts * spec.max_nodes, "cleanPodPolicy": "Running"},
            "pytorchReplicaSpecs": {
                "Worker": {
                    "replicas": spec.max_nodes,
                    "restartPolicy": "ExitCode",
                    "template": {"metadata": {"labels": labels(spec)}, "spec": pod_spec(spec, main)},
                }
            },
        },
    }
    return [job]
