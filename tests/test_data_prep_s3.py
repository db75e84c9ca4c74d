"""data_prep against a real S3-compatible server (moto on loopback) through s3fs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
from test_data_prep import worker_pids

from data_prep.__main__ import main
from data_prep.manifest import read_manifest, split_shards

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_prep", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def s3_images(s3_server, sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """200 CIFAR val images (20 per class) in s3://raw-images/cifar/val, and the same as a local folder;
    few, because every image is one request to the moto server."""
    local = tmp_path_factory.mktemp("s3_images") / "val"
    for folder in sorted((sample_dir / "val").iterdir()):
        (local / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:20]:
            (local / folder.name / image.name).write_bytes(image.read_bytes())
    s3_server.make_bucket("raw-images")
    fsspec.filesystem("s3").put(str(local), "raw-images/cifar/val", recursive=True)
    return "s3://raw-images/cifar/val", local


def test_shard_from_s3_into_s3_then_verify(s3_server, s3_images, tmp_path: Path, capsys) -> None:
    src, local = s3_images
    out = f"{s3_server.make_bucket('shards')}/cifar-val"
    fs = fsspec.filesystem("s3")

    # a subprocess with two workers: it reaches the server through the environment alone
    done = cli("shard", src, out, "--samples-per-shard", "50", "--workers", "2", "--seed", "0")
    assert done.returncode == 0, done.stderr
    assert "200 images in 4 shards" in done.stdout
    manifest = read_manifest(out)
    assert manifest["total_samples"] == 200 and len(manifest["classes"]) == 10
    assert split_shards(out, "train") == [f"{out}/train-{i:06d}.tar" for i in range(4)]
    assert not fs.exists("shards/cifar-val/.data_prep-progress")
    assert main(["verify", out]) == 0

    # the same images from the local folder give byte-identical shards
    assert main(["shard", str(local), str(tmp_path / "out"), "--samples-per-shard", "50"]) == 0
    for name in ("train-000000.tar", "train-000003.idx"):
        assert fs.cat_file(f"shards/cifar-val/{name}") == (tmp_path / "out" / name).read_bytes()

    damaged = bytearray(fs.cat_file("shards/cifar-val/train-000002.tar"))
    damaged[len(damaged) // 3] ^= 0x40
    fs.pipe_file("shards/cifar-val/train-000002.tar", bytes(damaged))
    capsys.readouterr()
    assert main(["verify", out]) == 1
    err = capsys.readouterr().err
    assert "damaged: train-000002.tar" in err and "train-000001" not in err


def test_s3_errors_exit_2_with_one_line(s3_server, tmp_path: Path, capsys) -> None:
    s3_server.make_bucket("errors-src")
    fsspec.filesystem("s3").pipe_file("errors-src/a/x.jpg", b"not really")
    assert main(["shard", "s3://errors-src/nothing-here", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "data_prep: source not found: s3://errors-src/nothing-here\n"

    assert main(["shard", "s3://errors-src/a", "s3://no-such-bucket/out"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write output s3://no-such-bucket/out" in err

    # no credentials at all: a fresh process, as credentials are resolved once per filesystem instance

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") or k == "AWS_ENDPOINT_URL_S3"}
    env |= {
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    }
    no_creds = cli("shard", "s3://errors-src/a", str(tmp_path / "out2"), env=env)
    assert no_creds.returncode == 2 and no_creds.stderr.count("\n") == 1, no_creds.stderr
    assert "s3://errors-src/a" in no_creds.stderr


@pytest.mark.slow
def test_killed_worker_then_rerun_into_s3_is_identical(s3_server, s3_images, tmp_path: Path, capsys) -> None:
    src, local = s3_images
    out = f"{s3_server.make_bucket('resumed')}/shards"
    cmd = [
        sys.executable,
        "-m",
        "data_prep",
        "shard",
        src,
        out,
        "--samples-per-shard",
        "10",
        "--workers",
        "2",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)
    deadline = time.monotonic() + 60
    while len(fs.find("resumed/shards/.data_prep-progress")) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before it could be interrupted"
        time.sleep(0.02)
    os.kill(worker_pids(proc.pid)[0], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "re-run" in stderr
    assert not fs.exists("resumed/shards/manifest.json")
    recorded = fs.find("resumed/shards/.data_prep-progress")
    assert 2 <= len(recorded) < 20
    capsys.readouterr()

    assert main(["shard", src, out, "--samples-per-shard", "10"]) == 0
    # only the shards without a progress record were processed again
    assert f"; {200 - 10 * len(recorded)} processed in" in capsys.readouterr().out
    assert main(["shard", str(local), str(tmp_path), "--samples-per-shard", "10"]) == 0
    for path in sorted(tmp_path.glob("train-*")):
        assert fs.cat_file(f"resumed/shards/{path.name}") == path.read_bytes(), path.name
