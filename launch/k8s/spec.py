"""What a Kubernetes training job needs to know, checked once at the CLI boundary."""

from __future__ import annotations

import re
from dataclasses import dataclass

from launch.k8s.secrets import CREDENTIAL_NAME, credential_in

# RFC 1123 label: the job name becomes pod hostnames and a Service name, so it must be a DNS label
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")  # a Secret's name
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


@dataclass(frozen=True)
class Toleration:
    key: str
    value: str | None = None  # None: tolerate the taint whatever its value (operator Exists)
    effect: str | None = None  # None: every effect

    @classmethod
    def parse(cls, text: str) -> Toleration:
        """kubectl's taint syntax: `key=value:Effect`, `key:Effect`, `key=value` or `key`."""
        rest, _, effect = text.partition(":")
        key, eq, value = rest.partition("=")
        if not key or (eq and not value):
            raise ValueError(f"--toleration {text!r}: expected key[=value][:Effect]")
        if effect and effect not in _EFFECTS:
            raise ValueError(f"--toleration {text!r}: effect must be one of {', '.join(_EFFECTS)}")
        return cls(key, value or None, effect or None)

    def to_k8s(self) -> dict[str, str]:
        out = {"key": self.key, "operator": "Equal" if self.value is not None else "Exists"}
        if self.value is not None:
            out["value"] = self.value
        if self.effect:
            out["effect"] = self.effect
        return out


@dataclass(frozen=True)
class LaunchSpec:
    """One multi-node training job: `nodes` pods, each running torchrun with `gpus_per_node` trainers."""

    name: str
    image: str
    config: str  # config path inside the image, relative to its working directory
    min_nodes: int
    max_nodes: int
    gpus_per_node: int
    namespace: str = "default"
    overrides: tuple[str, ...] = ()  # dotted trainer overrides (key=value)
    max_restarts: int = 3
    rdzv_port: int = 29400
    node_selector: tuple[tuple[str, str], ...] = ()
    tolerations: tuple[Toleration, ...] = ()
    wandb_secret: str | None = None  # Secret name; its key `wandb_secret_key` becomes WANDB_API_KEY
    wandb_secret_key: str = "api-key"
    s3_secret: str | None = None  # Secret whose keys (AWS_ACCESS_KEY_ID, ...) become environment variables
    shm_size: str = "64Gi"
    cpu: str | None = None
    memory: str | None = None
    grace_period_s: int = 300  # SIGTERM -> checkpoint (to S3) -> exit must fit inside it
    env: tuple[tuple[str, str], ...] = ()  # extra environment: NCCL_SOCKET_IFNAME, NCCL_DEBUG, ...
    secret_env: tuple[tuple[str, str, str], ...] = ()  # (variable, Secret name, key in the Secret)
    gpu_resource: str = "nvidia.com/gpu"
    workdir: str = "/app"  # the Dockerfile's WORKDIR

    def __post_init__(self) -> None:
        if not _DNS_LABEL.match(self.name) or len(self.name) > 50:
            raise ValueError(f"--name {self.name!r}: lower-case letters, digits and '-', at most 50 chars")
        if not _DNS_LABEL.match(self.namespace):
            raise ValueError(f"--namespace {self.namespace!r} is not a DNS label")
        if not 1 <= self.min_nodes <= self.max_nodes:
            raise ValueError(f"--nodes: need 1 <= MIN <= MAX, got {self.min_nodes}:{self.max_nodes}")
        if self.gpus_per_node < 0:
            raise ValueError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        if not 1 <= self.rdzv_port <= 65535:
            raise ValueError(f"--rdzv-port must be a TCP port, got {self.rdzv_port}")
        if self.grace_period_s < 30:
            raise ValueError(
                f"--grace-period must leave time to checkpoint (>= 30), got {self.grace_period_s}"
            )
        for flag, quantity in (("--shm-size", self.shm_size), ("--cpu", self.cpu), ("--memory", self.memory)):
            if quantity is not None and not _QUANTITY.match(quantity):
                raise ValueError(f"{flag} {quantity!r} is not a Kubernetes quantity (e.g. 64Gi, 500m)")
        for name, value in self.env:
            if not _ENV_NAME.match(name):
                raise ValueError(f"--env {name!r} is not an environment variable name")
            if CREDENTIAL_NAME.search(name) or credential_in(value):
                raise ValueError(
                    f"--env {name}: its value would be written in plain text into the manifest; put it in "
                    f"a Secret and pass --secret-env {name}[=SECRET[:KEY]] (or --s3-secret, --wandb-secret)"
                )
        for name, secret, key in self.secret_env:
            if not _ENV_NAME.match(name) or not _DNS_SUBDOMAIN.match(secret) or not key:
                raise ValueError(f"--secret-env {name}={secret}:{key}: expected VAR=SECRET[:KEY]")
        for override in self.overrides:
            key, eq, value = override.partition("=")
            if not eq:
                raise ValueError(f"--set {override!r}: expected key.sub=value")
            found = credential_in(value)
            if found:
                raise ValueError(
                    f"--set {key}: the value holds {found} that would be written into the manifest; "
                    "pass credentials through --s3-secret or --secret-env instead"
                )

    @property
    def nnodes(self) -> str:
        """torchrun's --nnodes: `N`, or `MIN:MAX` when the job may shrink and grow."""
        if self.min_nodes == self.max_nodes:
            return str(self.max_nodes)
        return f"{self.min_nodes}:{self.max_nodes}"

    @property
    def nproc_per_node(self) -> int:
        return max(self.gpus_per_node, 1)  # a CPU-only job still runs one trainer per pod


def parse_nodes(text: str) -> tuple[int, int]:
    """`4` -> (4, 4); `2:4` -> (2, 4) for an elastic job."""
    low, _, high = text.partition(":")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise ValueError(f"--nodes {text!r}: expected N or MIN:MAX") from None


def parse_secret_env(text: str) -> tuple[str, str, str]:
    """`VAR=SECRET:KEY` -> (VAR, SECRET, KEY); the key defaults to the variable's name. A bare `VAR`
    reads key VAR of the Secret named after it (`HF_TOKEN` -> Secret `hf-token`)."""
    if "=" not in text:
        return text, text.lower().replace("_", "-"), text
    name, secret = parse_pair(text, "--secret-env")
    secret, _, key = secret.partition(":")
    return name, secret, key or name


def parse_pair(text: str, flag: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not key or not eq:
        raise ValueError(f"{flag} {text!r}: expected KEY=VALUE")
    return key, value
