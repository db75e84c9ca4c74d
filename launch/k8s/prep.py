"""`python -m launch.k8s render-prep`: `data_prep shard` on many machines as one Kubernetes Indexed Job.

Pod `i` runs part `i` of N (`--part $(JOB_COMPLETION_INDEX)/N`); each part derives its own plan from the
listing, so there is no coordinator. A failed pod is retried on its own index (backoffLimitPerIndex), and
resumes what it had published. The merge is the last step of whichever part finishes last (`--merge`):
it writes manifest.json once every part's record is there; `python -m data_prep merge OUT` does the same
by hand. A retried pod waits for the lease its dead predecessor held on an object store (`--lock-wait`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.__main__ import build_parser as data_prep_parser
from data_prep.__main__ import shard_config
from data_prep.parts import LEASE_S
from launch.k8s.spec import _DNS_LABEL, _QUANTITY, Toleration, parse_pair, parse_secret_env

CONTAINER = "data-prep"
BAD_INPUT = 2  # data_prep's exit code for input that fails the same way on any node
INDEX_ANNOTATION = "metadata.annotations['batch.kubernetes.io/job-completion-index']"

EXAMPLES = """examples:
  python -m launch.k8s render-prep --parts 16 --image registry.example.com/ssl:0.1.0 \\
      --src s3://bucket/inventory.parquet --out s3://bucket/shards --s3-secret s3-credentials \\
      --cpu 8 --memory 16Gi -- --path-column url --workers 8 --samples-per-shard 1000 > prep.yaml
  kubectl apply -f prep.yaml && kubectl wait --for=condition=complete job/data-prep --timeout=24h
"""


@dataclass(frozen=True)
class PrepSpec:
    name: str
    image: str
    src: str
    out: str
    parts: int
    shard_args: tuple[str, ...] = ()  # more `data_prep shard` flags, checked by data_prep's own parser
    namespace: str = "default"
    parallelism: int | None = None  # pods at once; None: every part at once
    retries: int = 3  # per part (index)
    s3_secret: str | None = None
    secret_env: tuple[tuple[str, str, str], ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    node_selector: tuple[tuple[str, str], ...] = ()
    tolerations: tuple[Toleration, ...] = ()
    cpu: str | None = None
    memory: str | None = None
    workdir: str = "/app"

    def __post_init__(self) -> None:
        if not _DNS_LABEL.match(self.name) or len(self.name) > 50:
            raise ValueError(f"--name {self.name!r}: lower-case letters, digits and '-', at most 50 chars")
        if not _DNS_LABEL.match(self.namespace):
            raise ValueError(f"--namespace {self.namespace!r} is not a DNS label")
        if self.parts < 1:
            raise ValueError(f"--parts must be >= 1, got {self.parts}")
        if self.parallelism is not None and self.parallelism < 1:
            raise ValueError(f"--parallelism must be >= 1, got {self.parallelism}")
        if self.retries < 0:
            raise ValueError(f"--retries must be >= 0, got {self.retries}")
        for flag, quantity in (("--cpu", self.cpu), ("--memory", self.memory)):
            if quantity is not None and not _QUANTITY.match(quantity):
                raise ValueError(f"{flag} {quantity!r} is not a Kubernetes quantity (e.g. 8, 16Gi)")
        reserved = {"--part", "--merge", "--lock-wait"} & {a.split("=", 1)[0] for a in self.shard_args}
        if reserved:
            raise ValueError(f"{sorted(reserved)[0]} is set by render-prep itself; leave it out after --")
        self._check_shard_args()

    def command(self) -> list[str]:
        """The pod's command; Kubernetes expands $(JOB_COMPLETION_INDEX) from the container's env."""
        return [
            "python", "-m", "data_prep", "shard", self.src, self.out,
            "--part", f"$(JOB_COMPLETION_INDEX)/{self.parts}", "--merge",
            "--lock-wait", str(int(2 * LEASE_S)), *self.shard_args,
        ]  # fmt: skip

    def _check_shard_args(self) -> None:
        """Parse the pod's command as data_prep will, so a bad flag fails here and not in N pods."""
        argv = [a.replace("$(JOB_COMPLETION_INDEX)", "0") for a in self.command()[3:]]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                shard_config(data_prep_parser().parse_args(argv))
        except SystemExit:
            last = (err.getvalue().strip().splitlines() or ["invalid"])[-1]
            raise ValueError(f"data_prep shard flags after --: {last.split('error: ', 1)[-1]}") from None
        except ValueError as e:
            raise ValueError(f"data_prep shard flags after --: {e}") from None


def labels(spec: PrepSpec) -> dict[str, str]:
    return {"app.kubernetes.io/name": "contrastive-pipeline-prep", "app.kubernetes.io/instance": spec.name}


def render(spec: PrepSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        # declared, so that $(JOB_COMPLETION_INDEX) in the command expands to this pod's index
        {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {"fieldPath": INDEX_ANNOTATION}}},
        *({"name": k, "value": v} for k, v in spec.env),
        *(
            {"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
            for var, secret, key in spec.secret_env
        ),
    ]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        "command": spec.command(),
        "workingDir": spec.workdir,
        "env": env,
    }
    if spec.s3_secret:
        container["envFrom"] = [{"secretRef": {"name": spec.s3_secret}}]
    requests = {k: v for k, v in (("cpu", spec.cpu), ("memory", spec.memory)) if v is not None}
    if requests:
        limits = {"memory": spec.memory} if spec.memory else {}
        container["resources"] = {"requests": requests, **({"limits": limits} if limits else {})}
    pod: dict[str, Any] = {
        "restartPolicy": "Never",  # required by podFailurePolicy; a retry is a new pod on the same index
        "securityContext": {"runAsNonRoot": True},
        "containers": [container],
    }
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = [t.to_k8s() for t in spec.tolerations]
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": labels(spec)},
        "spec": {
            "completionMode": "Indexed",
            "completions": spec.parts,
            "parallelism": min(spec.parallelism or spec.parts, spec.parts),
            "backoffLimitPerIndex": spec.retries,  # a crashed or killed part is retried on its own
            "maxFailedIndexes": 0,  # a part out of retries fails the Job: the merge could never run
            "podFailurePolicy": {
                "rules": [
                    # preemption, eviction, a drain or a lost node: retry the part, spend no budget
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                    # bad input (a missing column, labels that do not fit) fails again on any node
                    {
                        "action": "FailJob",
                        "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [BAD_INPUT]},
                    },
                ]
            },
            "template": {"metadata": {"labels": labels(spec)}, "spec": pod},
        },
    }
    return [job]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "render-prep",
        help="print (or write) an Indexed Job that runs `data_prep shard` in N parts, then merges",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--parts", type=int, required=True, help="N: pods (indexes), each shards 1/N of SRC")
    p.add_argument("--image", required=True, help="the image built from this repository's Dockerfile")
    p.add_argument("--src", required=True, help="SRC of `data_prep shard` (a listing file avoids LIST calls)")
    p.add_argument("--out", required=True, help="OUT of `data_prep shard`: storage every pod can write")
    p.add_argument("--name", default="data-prep", help="job name")
    p.add_argument("--namespace", default="default")
    p.add_argument("--parallelism", type=int, help="pods at once (default: all parts)")
    p.add_argument("--retries", type=int, default=3, help="retries per part (backoffLimitPerIndex)")
    p.add_argument("--s3-secret", metavar="NAME", help="Secret with AWS_ACCESS_KEY_ID, ... as variables")
    p.add_argument("--secret-env", action="append", default=[], metavar="VAR=SECRET[:KEY]")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE][:EFFECT]")
    p.add_argument("--cpu", help="CPU request per pod, e.g. 8")
    p.add_argument("--memory", help="memory request and limit per pod, e.g. 16Gi")
    p.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    p.add_argument("shard_args", nargs=argparse.REMAINDER, help="-- then more `data_prep shard` flags")


def spec_from_args(args: argparse.Namespace) -> PrepSpec:
    extra = args.shard_args[1:] if args.shard_args[:1] == ["--"] else args.shard_args
    return PrepSpec(
        name=args.name,
        image=args.image,
        src=args.src,
        out=args.out,
        parts=args.parts,
        shard_args=tuple(extra),
        namespace=args.namespace,
        parallelism=args.parallelism,
        retries=args.retries,
        s3_secret=args.s3_secret,
        secret_env=tuple(parse_secret_env(e) for e in args.secret_env),
        env=tuple(parse_pair(e, "--env") for e in args.env),
        node_selector=tuple(parse_pair(s, "--node-selector") for s in args.node_selector),
        tolerations=tuple(Toleration.parse(t) for t in args.toleration),
        cpu=args.cpu,
        memory=args.memory,
    )
