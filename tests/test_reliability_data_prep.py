"""data_prep under hostile input and faults: OUT inside SRC, presigned URL lists with a dead URL, the
parent killed with SIGTERM or SIGKILL, the S3 store lost mid-run. Real processes, signals, an HTTP server
and a moto S3 server on loopback."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_data_prep import REPO, shard, worker_pids

from data_prep.manifest import read_manifest

SECRETS = ("SECRETSIGNATURE", "SECRETCREDENTIAL", "SECRETTOKEN")


@pytest.fixture
def small_src(sample_dir: Path, tmp_path: Path) -> Path:
    """40 labelled images (2 classes x 20)."""
    src = tmp_path / "src"
    for cls in ("airplane", "cat"):
        (src / cls).mkdir(parents=True)
        for image in sorted((sample_dir / "train" / cls).iterdir())[:20]:
            shutil.copy(image, src / cls / image.name)
    return src


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_inside_src_and_a_shard_folder_as_src_are_refused(
    small_src: Path, tmp_path: Path, capsys
) -> None:
    """`shard DIR DIR` twice used to ingest its own shards (labels gone, shards overwritten, exit 0)."""
    before = _tree(small_src)
    for out in (small_src, small_src / "shards"):
        assert shard(small_src, out) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"OUT {out} is inside SRC {small_src}" in err
    assert _tree(small_src) == before  # refused before anything was written

    out = tmp_path / "out"
    assert shard(small_src, out) == 0
    assert shard(out, tmp_path / "again") == 2
    assert f"SRC {out} is a data_prep output" in capsys.readouterr().err
    assert shard(small_src, out) == 0  # re-running into a separate OUT stays the documented resume
    assert read_manifest(str(out))["total_samples"] == 40


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving a folder (it ignores query strings, as S3 would check them)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # its log would hold the query strings
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_presigned_url_list_keeps_no_credentials_and_lists_the_dead_url(
    small_src: Path, http_root: tuple[str, Path], tmp_path: Path, capsys
) -> None:
    base, root = http_root
    query = (
        "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=SECRETCREDENTIAL&X-Amz-Signature=SECRETSIGNATURE"
    )
    lines = []
    for image in sorted(small_src.rglob("*.jpg"))[:12]:
        shutil.copy(image, root / image.name)
        lines.append(f"{base}/{image.name}?{query}\t{image.parent.name}")
    lines.append(f"{base}/gone.jpg?{query}\tcat")  # a dead URL
    (tmp_path / "urls.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert shard(tmp_path / "urls.txt", out, "--samples-per-shard", "5") == 0
    assert shard(f"{base}/missing.txt?token=SECRETTOKEN", tmp_path / "out2") == 2  # an error line too
    captured = capsys.readouterr()
    assert f"source not found: {base}/missing.txt" in captured.err

    manifest = read_manifest(str(out))
    assert manifest["total_samples"] == 12
    [dead] = manifest["rejected"]
    assert dead["path"] == f"{base}/gone.jpg" and dead["reason"].startswith("unreadable: FileNotFoundError")
    metas = [json.loads(b) for name, b in _tar_members(out).items() if name.endswith(".json")]
    assert len(metas) == 12 and all(m["path"].startswith(f"{base}/") and "?" not in m["path"] for m in metas)
    everything = b"".join(_tree(out).values()) + (captured.out + captured.err).encode()
    assert not [s for s in SECRETS if s.encode() in everything]


def _tar_members(out: Path) -> dict[str, bytes]:
    import tarfile

    members = {}
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            members |= {f"{path.name}/{m.name}": tar.extractfile(m).read() for m in tar}
    return members


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_and_wait_for_a_shard(src: Path, out: Path) -> tuple[subprocess.Popen, list[int]]:
    cmd = [sys.executable, "-m", "data_prep", "shard", str(src), str(out), "--samples-per-shard", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([*cmd, "--workers", "2"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list((out / ".data_prep-progress").glob("*.json")) or len(worker_pids(proc.pid)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before it could be stopped"
        time.sleep(0.02)
    return proc, worker_pids(proc.pid)


def _wait_gone(pids: list[int], timeout: float = 20) -> list[int]:
    deadline = time.monotonic() + timeout
    while [p for p in pids if _alive(p)] and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def test_killing_the_parent_leaves_no_worker_running_and_no_temp_file(
    small_src: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc, workers = _start_and_wait_for_a_shard(small_src, out)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
    assert _wait_gone(workers) == []
    assert not [p.name for p in out.rglob("*") if ".tmp" in p.name]  # removed on SIGTERM
    kept = sorted((out / ".data_prep-progress").glob("*.json"))  # the resume state stays
    assert kept

    shutil.rmtree(out)
    proc, workers = _start_and_wait_for_a_shard(small_src, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _wait_gone(workers) == []  # PR_SET_PDEATHSIG: no worker reparented to PID 1 keeps running
    (out / "train-000099.tar.tmp").write_bytes(b"a worker's half shard")  # as SIGKILL can leave them
    (out / "train-000099.idx.tmp-0badc0de").write_bytes(b"")
    assert shard(small_src, out, "--samples-per-shard", "2") == 0
    assert (
        not [p.name for p in out.rglob("*") if ".tmp" in p.name]
        and not (out / ".data_prep-progress").exists()
    )
    assert read_manifest(str(out))["total_samples"] == 40


def test_s3_store_lost_mid_run_is_one_line(small_src: Path, tmp_path: Path) -> None:
    """The moto server stops after the first shard lands: one line, exit 2, no traceback."""
    import s3

    server = s3.start_s3_server()
    try:
        server.make_bucket("lost-mid-run")
        cmd = [sys.executable, "-m", "data_prep", "shard", str(small_src), "s3://lost-mid-run/out"]
        env = {**os.environ, **server.env, "PYTHONPATH": str(REPO), "AWS_MAX_ATTEMPTS": "1"}
        proc = subprocess.Popen(
            [*cmd, "--samples-per-shard", "1"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
        )
        fs = server.filesystem()
        deadline = time.monotonic() + 60
        while True:
            fs.invalidate_cache()
            if fs.exists("lost-mid-run/out/train-000000.tar"):
                break
            assert proc.poll() is None and time.monotonic() < deadline, "run ended before the server stopped"
            time.sleep(0.05)
    finally:
        server.stop()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr[-3000:]
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert "s3://lost-mid-run/out" in stderr and "re-run to resume" in stderr
