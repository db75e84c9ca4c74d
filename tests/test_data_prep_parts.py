"""Sharding in parts: the Indexed Job `render-prep` writes validates against the Kubernetes schemas, and
its pods' command run as 4 local processes at once gives a merged manifest whose samples equal a 1-part
run's; merge refuses, naming the missing parts; two writers of one part: the second is refused, locally
(flock) and on S3 (a lease), and a dead writer's lease is taken over."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from test_launch_k8s import K8S_VERSIONS, validate

from data_prep.__main__ import main
from data_prep.manifest import read_manifest
from data_prep.parts import Part, PartLock
from launch.k8s.__main__ import main as k8s_main

from shard_contents import shard_samples

REPO = Path(__file__).resolve().parent.parent


def sample_set(out: Path) -> set[tuple[str, bytes, int]]:
    """(source path, image bytes, label) of every sample in the manifest's shards."""
    return {(path, image, label) for path, (image, label) in shard_samples(out).items()}


@pytest.fixture(scope="module")
def listing(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A parquet listing (path, class) of the 500 CIFAR val images, as an S3 Inventory export would be."""
    images = sorted((sample_dir / "val").rglob("*.jpg"))
    path = tmp_path_factory.mktemp("listing") / "inventory.parquet"
    table = pa.table({"path": [str(p) for p in images], "class": [p.parent.name for p in images]})
    pq.write_table(table, path, row_group_size=100)
    return path


def render_prep(argv: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert k8s_main(["render-prep", *argv]) == 0
    (job,) = yaml.safe_load_all(out.getvalue())
    return job


def test_four_parts_of_the_rendered_job_equal_a_one_part_run(listing: Path, tmp_path: Path) -> None:
    flags = ["--label-column", "class", "--samples-per-shard", "40", "--val-fraction", "0.1"]
    out = tmp_path / "parts"
    job = render_prep(
        [
            "--parts",
            "4",
            "--image",
            "img:1",
            "--src",
            str(listing),
            "--out",
            str(out),
            "--cpu",
            "2",
            "--",
            *flags,
        ]
    )
    for version in K8S_VERSIONS:
        validate(job, version)
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    assert spec["backoffLimitPerIndex"] == 3 and spec["maxFailedIndexes"] == 0
    (container,) = spec["template"]["spec"]["containers"]
    index_env = next(e for e in container["env"] if e["name"] == "JOB_COMPLETION_INDEX")
    assert "job-completion-index" in index_env["valueFrom"]["fieldRef"]["fieldPath"]

    # each "pod": the container's command, with $(JOB_COMPLETION_INDEX) expanded as Kubernetes does
    procs = []
    for index in range(4):
        command = [a.replace("$(JOB_COMPLETION_INDEX)", str(index)) for a in container["command"]]
        assert command[:3] == ["python", "-m", "data_prep"]
        env = {**os.environ, "JOB_COMPLETION_INDEX": str(index)}
        procs.append(
            subprocess.Popen(
                [sys.executable, *command[1:]], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
            )
        )
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs
    assert sum("every part finished" in o for o in outputs) >= 1  # the last to finish merged

    whole = tmp_path / "whole"
    assert main(["shard", str(listing), str(whole), *flags]) == 0
    merged = read_manifest(str(out))
    assert merged["parts"] == 4 and merged["total_samples"] == 500
    assert merged["classes"] == read_manifest(str(whole))["classes"]
    assert sample_set(out) == sample_set(whole)
    names = [s["name"] for split in merged["splits"].values() for s in split["shards"]]
    assert len(names) == len(set(names))
    for index in range(4):
        assert any(n.startswith(f"train-p{index:04d}-") for n in names)
        assert any(n.startswith(f"val-p{index:04d}-") for n in names)
    assert not list(out.rglob("*.tmp*")) and not list((out / ".data_prep-progress").iterdir())
    assert main(["verify", str(out)]) == 0


def test_merge_refuses_naming_missing_parts(listing: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    flags = ["--label-column", "class", "--samples-per-shard", "100"]
    for index in (0, 2):
        assert main(["shard", str(listing), str(out), "--part", f"{index}/3", "--merge", *flags]) == 0
    assert "not merged yet" in capsys.readouterr().out
    assert main(["merge", str(out)]) == 2
    err = capsys.readouterr().err
    assert "1 of 3 parts not finished yet: 1/3" in err and err.count("\n") == 1
    assert not (out / "manifest.json").exists()
    assert main(["shard", str(listing), str(out), "--part", "1/3", *flags]) == 0
    assert main(["merge", str(out)]) == 0
    assert read_manifest(str(out))["total_samples"] == 500
    # a re-run of a finished part is a no-op that keeps the merged manifest
    assert main(["shard", str(listing), str(out), "--part", "1/3", *flags]) == 0
    assert "0 processed" in capsys.readouterr().out and (out / "manifest.json").exists()


def test_second_writer_of_a_part_is_refused_locally(listing: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    fs = fsspec.filesystem("file")
    with PartLock(fs, str(out), Part(1, 2)):
        assert main(["shard", str(listing), str(out), "--part", "1/2", "--label-column", "class"]) == 2
        err = capsys.readouterr().err
        assert f"part 1/2 of this OUT is being written by pid {os.getpid()}" in err and err.count("\n") == 1
        assert not list(out.glob("*.tar"))
        # the other part is free, and so is this one once its writer is gone
        assert main(["shard", str(listing), str(out), "--part", "0/2", "--label-column", "class"]) == 0
    assert main(["shard", str(listing), str(out), "--part", "1/2", "--label-column", "class", "--merge"]) == 0
    assert read_manifest(str(out))["total_samples"] == 500


def test_second_writer_refused_and_dead_lease_taken_over_on_s3(s3_server, listing: Path, capsys) -> None:
    out = f"{s3_server.make_bucket('parts')}/shards"
    fs = fsspec.filesystem("s3")
    argv = [
        "shard",
        str(listing),
        out,
        "--part",
        "0/2",
        "--label-column",
        "class",
        "--samples-per-shard",
        "250",
    ]
    with PartLock(fs, "parts/shards", Part(0, 2)):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "part 0/2 of this OUT is being written by pid" in err and err.count("\n") == 1
    assert not fs.exists("parts/shards/.data_prep-locks/part-0000-of-0002.lock")  # released

    # a writer that died without releasing: its lease stopped being renewed long ago
    dead = {"host": "gone", "pid": 1, "token": "x", "since": "earlier", "renewed": time.time() - 3600}
    fs.pipe_file("parts/shards/.data_prep-locks/part-0000-of-0002.lock", json.dumps(dead).encode())
    assert main(argv) == 0
    assert main([*argv[:4], "1/2", *argv[5:], "--merge"]) == 0
    assert read_manifest(out)["total_samples"] == 500


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--parts", "0"], "--parts must be >= 1"),
        (["--parts", "2", "--", "--part", "0/2"], "--part is set by render-prep itself"),
        (["--parts", "2", "--", "--samples-per-shard", "0"], "--samples-per-shard"),
        (["--parts", "2", "--", "--bogus"], "unrecognized arguments: --bogus"),
        (["--parts", "2", "--name", "Bad_Name"], "--name"),
    ],
)
def test_render_prep_refuses_in_one_line(argv: list[str], message: str, capsys) -> None:
    base = ["render-prep", "--image", "img:1", "--src", "s3://b/list.parquet", "--out", "s3://b/shards"]
    assert k8s_main([*base, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_more_parts_than_items(sample_dir: Path, tmp_path: Path, capsys) -> None:
    """A part with no items finishes (exit 0) so that the Job's merge can run; merge counts them all."""
    src = tmp_path / "three"
    src.mkdir()
    for image in sorted((sample_dir / "val" / "cat").iterdir())[:3]:
        (src / image.name).write_bytes(image.read_bytes())
    out = tmp_path / "out"
    for index in range(5):
        assert main(["shard", str(src), str(out), "--part", f"{index}/5", "--merge"]) == 0
    assert read_manifest(str(out))["total_samples"] == 3 and "every part finished" in capsys.readouterr().out
