"""Launchers for torchrun, SLURM and Kubernetes."""
