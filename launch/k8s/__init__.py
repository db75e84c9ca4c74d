"""Kubernetes manifests for multi-node training, rendered from one `LaunchSpec` (`python -m launch.k8s`)."""

from launch.k8s.spec import LaunchSpec, Toleration

__all__ = ["LaunchSpec", "Toleration"]
