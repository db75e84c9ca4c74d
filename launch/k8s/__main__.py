"""`python -m launch.k8s render ...` — write Kubernetes manifests for a multi-node training job.

Each file starts with the command that rendered it, so a checked-in example can be re-rendered exactly.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from launch.k8s import indexed_job, prep, pytorchjob
from launch.k8s.secrets import redact_argv
from launch.k8s.spec import LaunchSpec, Toleration, parse_nodes, parse_pair, parse_secret_env
from pipeline.config import ConfigError, load

REPO = Path(__file__).resolve().parents[2]  # the image's working directory holds this checkout

KINDS = {"indexed-job": indexed_job.render, "pytorchjob": pytorchjob.render}

EXAMPLES = """examples:
  python -m launch.k8s render --nodes 4 --gpus-per-node 8 --image registry.example.com/ssl:0.1.0 \\
      --config configs/cifar10_simclr.yaml --set data.train_shards=s3://bucket/shards \\
      --wandb-secret wandb --s3-secret s3-credentials > job.yaml && kubectl apply -f job.yaml
  python -m launch.k8s render --kind pytorchjob --nodes 2:4 --gpus-per-node 8 --image IMG --config CFG \\
      --node-selector nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3 --toleration nvidia.com/gpu:NoSchedule
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch.k8s",
        description="Render Kubernetes manifests that run `python -m pipeline.train` under torchrun.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "render",
        help="print (or write) the manifests",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument(
        "--kind",
        choices=sorted(KINDS),
        default="indexed-job",
        help="indexed-job: Job + headless Service (no operator); pytorchjob: Kubeflow training operator",
    )
    r.add_argument("--nodes", required=True, help="pods: N, or MIN:MAX for an elastic job")
    r.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (= trainer processes) per pod")
    r.add_argument("--image", required=True, help="the image built from this repository's Dockerfile")
    r.add_argument("--config", required=True, help="trainer config path inside the image (configs/...)")
    r.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="trainer override, e.g. data.train_shards=s3://bucket/shards (repeatable)",
    )
    r.add_argument("--name", default="ssl-pretrain", help="job name, also the pods' DNS prefix")
    r.add_argument("--namespace", default="default")
    r.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        help="restarts of a pod's trainers within an hour (MAX_RESTARTS); also sizes the Job's backoffLimit",
    )
    r.add_argument("--rdzv-port", type=int, default=29400)
    r.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE][:EFFECT]")
    r.add_argument(
        "--wandb-secret",
        metavar="NAME[:KEY]",
        help="Secret holding the W&B API key (key defaults to api-key)",
    )
    r.add_argument(
        "--s3-secret",
        metavar="NAME",
        help="Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL_S3, ...)",
    )
    r.add_argument("--shm-size", default="64Gi", help="memory-backed /dev/shm size")
    r.add_argument("--cpu", help="CPU request per pod, e.g. 64")
    r.add_argument("--memory", help="memory request and limit per pod, e.g. 512Gi")
    r.add_argument(
        "--grace-period",
        type=int,
        default=300,
        help="terminationGracePeriodSeconds: time to checkpoint after SIGTERM",
    )
    r.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment, e.g. NCCL_SOCKET_IFNAME=eth0 (repeatable); never credentials",
    )
    r.add_argument(
        "--secret-env",
        action="append",
        default=[],
        metavar="VAR=SECRET[:KEY]",
        help="variable from a key of a Secret (the key defaults to VAR), e.g. HF_TOKEN=hf (repeatable)",
    )
    r.add_argument("--gpu-resource", default="nvidia.com/gpu")
    r.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    prep.add_parser(sub)
    return parser


def spec_from_args(args: argparse.Namespace) -> LaunchSpec:
    min_nodes, max_nodes = parse_nodes(args.nodes)
    secret, _, key = (args.wandb_secret or "").partition(":")
    return LaunchSpec(
        name=args.name,
        image=args.image,
        config=args.config,
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        gpus_per_node=args.gpus_per_node,
        namespace=args.namespace,
        overrides=tuple(args.overrides),
        max_restarts=args.max_restarts,
        rdzv_port=args.rdzv_port,
        node_selector=tuple(parse_pair(s, "--node-selector") for s in args.node_selector),
        tolerations=tuple(Toleration.parse(t) for t in args.toleration),
        wandb_secret=secret or None,
        wandb_secret_key=key or "api-key",
        s3_secret=args.s3_secret,
        shm_size=args.shm_size,
        cpu=args.cpu,
        memory=args.memory,
        grace_period_s=args.grace_period,
        env=tuple(parse_pair(e, "--env") for e in args.env),
        secret_env=tuple(parse_secret_env(e) for e in args.secret_env),
        gpu_resource=args.gpu_resource,
    )


def check_trainer_config(spec: LaunchSpec) -> None:
    """Load `--config` with the `--set` overrides the way `python -m pipeline.train` will in the pod, so
    an unknown key or a bad value is refused here, not after the pods were scheduled."""
    path = REPO / spec.config.removeprefix(f"{spec.workdir}/")
    if not path.is_file():
        raise ValueError(f"--config {spec.config}: no such file in {REPO}, from which the image is built")
    try:
        load(path, list(spec.overrides))
    except ConfigError as e:
        raise ValueError(f"--config/--set: {e}") from None


def to_yaml(documents: list[dict[str, Any]], argv: list[str]) -> str:
    header = "# Rendered by: python -m launch.k8s " + shlex.join(redact_argv(argv)) + "\n"
    return header + yaml.safe_dump_all(documents, sort_keys=False, explicit_start=True, width=110)


def _without_output(argv: list[str]) -> list[str]:
    """The command line minus `-o/--output FILE`: the header must not depend on where the file went."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("-o", "--output"):
            skip = True
        elif not a.startswith(("--output=", "-o")):
            out.append(a)
    return out


def check_output(path: Path) -> None:
    """`-o` names a file in a folder that exists: refused before rendering, not with a traceback after."""
    if path.is_dir():
        raise ValueError(f"-o {path} is a directory; name a file in it, e.g. -o {path / 'job.yaml'}")
    if not path.parent.is_dir():
        raise ValueError(f"-o {path}: the folder {path.parent} does not exist; create it or write elsewhere")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        if args.output:
            check_output(args.output)
        if args.command == "render-prep":
            documents = prep.render(prep.spec_from_args(args))
        else:
            spec = spec_from_args(args)
            check_trainer_config(spec)
            documents = KINDS[args.kind](spec)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = to_yaml(documents, _without_output(argv))
    if args.output:
        try:
            args.output.write_text(text)
        except OSError as e:
            print(f"error: -o {args.output}: {e.strerror}; choose a writable path", file=sys.stderr)
            return 2
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
