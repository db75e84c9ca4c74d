"""Issue 28, what the new backend, methods and resume rules let through, each with real files and
processes: PNGs of every bit depth and mode written with PIL and sharded by data_prep, two trainings
sharing one checkpoint location (local and on a moto S3 server), SwAV resumed under 2 gloo ranks with
a new batch size, impossible configs refused in one line with exit 2 before anything is written.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_train import ROOT, _env, _overrides, _tiny, _train_cmd, _train_here, _wait_for

from pipeline.schema import ConfigError

from run_outputs import checkpoint_step, step_rows

NO_WANDB = "logging.wandb.mode=disabled"


@pytest.fixture(scope="module")
def tiny(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """96 labelled 32x32 images: 6 steps of 16 per epoch."""
    return _tiny(sample_dir, "train", 32, tmp_path_factory)


def _last_err_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1] if lines else ""


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


# ------------------------------------------------------------------ 1. bit depth and mode, one place


def test_decode_gives_uint8_rgb_for_every_bit_depth_and_mode():
    """16-bit PNGs are rescaled (0x8000 grey is 128, not the low byte 0); 1-bit, palette, grey+alpha,
    RGBA and CMYK come back as the same RGB that PIL's own conversion gives."""
    from pipeline.data.samples import decode

    levels = np.array([[0, 257, 0x8000, 0xFFFF, 1000]], dtype=np.uint16).repeat(4, 0)
    image = decode(_png(Image.fromarray(levels)))  # PIL writes mode I;16 as a 16-bit grey PNG
    assert image.dtype == torch.uint8 and image.shape == (3, 4, 5)
    expected = torch.tensor(np.round(levels / 65535 * 255).astype(np.uint8))
    assert torch.equal(image, expected.expand(3, 4, 5))

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8))
    modes = {
        "1-bit": Image.fromarray(rng.integers(0, 2, (6, 7)).astype(bool)),
        "palette": rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
        "grey+alpha": rgb.convert("LA"),
        "RGBA": rgb.convert("RGBA"),
    }
    for name, im in modes.items():
        want = torch.tensor(np.asarray(im.convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(decode(_png(im)), want), name
    cmyk = Image.new("CMYK", (7, 6), (0, 255, 0, 0))  # magenta
    assert decode(_png(cmyk, "JPEG"))[:, 0, 0].tolist() == [255, 0, 255]


@pytest.fixture(scope="module")
def odd_pngs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One class of PNGs written with PIL: a uniform 0x8000 16-bit grey, a 1-bit checkerboard, an 8-bit
    RGB one."""
    src = tmp_path_factory.mktemp("odd_src")
    (src / "a").mkdir()
    Image.fromarray(np.full((20, 24), 0x8000, dtype=np.uint16)).save(src / "a" / "0_grey16.png")
    Image.fromarray((np.indices((20, 24)).sum(0) % 2).astype(bool)).save(src / "a" / "1_bits.png")
    Image.new("RGB", (24, 20), (10, 200, 30)).save(src / "a" / "2_rgb.png")
    return src


@pytest.mark.parametrize("resize", [None, 10])
def test_16bit_and_1bit_pngs_reach_the_torch_backend_as_uint8(
    resize: int | None, odd_pngs: Path, tmp_path: Path
):
    """data_prep stores them (as they are, or re-encoded by --resize-short) and the resident decode of
    the torch backend reads the 16-bit grey as 128 everywhere and the 1-bit image as 0/255, in a uint8
    batch (was: uint16, and the grey's low byte, 0, once cast)."""
    from data_prep.__main__ import main as data_prep_main
    from pipeline.data.resident import decode_resident
    from pipeline.data.shards import load_shard_set

    argv = ["shard", str(odd_pngs), str(tmp_path / "shards"), "--labels", "auto", "--workers", "1"]
    assert data_prep_main([*argv, *(["--resize-short", str(resize)] if resize else [])]) == 0
    shards = load_shard_set(str(tmp_path / "shards"), "train")
    resident = decode_resident(shards, device=torch.device("cpu"), budget_bytes=2**20, num_workers=0)
    h, w = (20, 24) if resize is None else (10, 12)
    assert resident.images.dtype == torch.uint8 and resident.images.shape == (3, 3, h, w)
    values = [set(image.unique().tolist()) for image in resident.images]
    assert {128} in values and {10, 30, 200} in values  # the grey, the RGB one
    if resize is None:  # resampled, the checkerboard holds greys too
        assert {0, 255} in values


# ------------------------------------------------------------------ 4. the resident budget, before allocating


@pytest.fixture(scope="module")
def long_thin_pngs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight tiny-on-disk PNGs, 1500x30 and 30x1500: padded together they decode to 8 x 3 x 1500 x 1500
    bytes (51.5 MiB) from a few kilobytes of shards."""
    from conftest import shard_folder

    src = tmp_path_factory.mktemp("thin_src")
    (src / "a").mkdir()
    for i in range(8):
        size = (30, 1500) if i % 2 else (1500, 30)
        Image.new("RGB", size, (i, i, i)).save(src / "a" / f"{i}.png")
    return shard_folder(src, tmp_path_factory.mktemp("thin_shards"), samples_per_shard=8)


def test_resident_budget_is_checked_from_the_headers_before_decoding(long_thin_pngs: Path):
    from pipeline.data.resident import OverBudget, decode_resident
    from pipeline.data.shards import load_shard_set

    shards = load_shard_set(str(long_thin_pngs), "train")
    budget = int(0.01 * 2**30)
    with pytest.raises(OverBudget) as refused:
        decode_resident(shards, device=torch.device("cpu"), budget_bytes=budget, num_workers=2)
    assert "8 images padded to 1500x1500, from their headers" in str(refused.value)
    assert "data.source=stream" in str(refused.value)
    resident = decode_resident(shards, device=torch.device("cpu"), budget_bytes=60 * 2**20, num_workers=0)
    assert resident.images.shape == (8, 3, 1500, 1500)
    assert sorted(map(tuple, resident.sizes.tolist())) == [(30, 1500)] * 4 + [(1500, 30)] * 4


@pytest.mark.parametrize("budget", ["inf", "1e300", ".nan"])
def test_resident_budget_must_be_finite(budget: str, tiny: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    argv = [
        *_overrides(tiny, tiny, out, NO_WANDB),
        "data.backend=torch",
        f"data.resident_budget_gib={budget}",
    ]
    assert _train_here(argv) == 2
    assert "data.resident_budget_gib" in _last_err_line(capsys) and not out.exists()


# ------------------------------------------------------------------ 2. one training per checkpoint location


@pytest.mark.slow
def test_a_second_run_into_a_leased_checkpoint_dir_is_refused_and_a_dead_holder_taken_over(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """A (another process) trains into `shared`; B (another run folder, same checkpoint.dir) is refused in
    one line naming A, before writing anything, and A's checkpoints stay A's (was: both exit 0 and only
    one run's steps remain). Once A is SIGKILLed its lease is stale (its pid is gone on this host): B
    takes the location over without waiting for the lease to expire."""
    shared, run_a, run_b = tmp_path / "shared", tmp_path / "a", tmp_path / "b"
    common = [NO_WANDB, f"checkpoint.dir={shared}", "checkpoint.every_steps=2"]
    cmd = _train_cmd([*_overrides(tiny, tiny, run_a, *common), "train.max_steps=null", "train.epochs=500"])
    a = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: (shared / "latest").is_file() and (shared / ".lease").is_file(), a)
        lease = json.loads((shared / ".lease").read_text())
        assert lease["holder"] == str(run_a.resolve()) and lease["pid"] == a.pid
        assert _train_here([*_overrides(tiny, tiny, run_b, *common), "method.temperature=0.5"]) == 2
        line = _last_err_line(capsys)
        assert f"checkpoint.dir {shared} is in use by another training" in line and str(run_a) in line
        assert not any((run_b / name).exists() for name in ("config.yaml", "metrics.jsonl", "checkpoints"))
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
    newest = (shared / "latest").read_text().strip()
    saved = torch.load(shared / newest / "state.pt", weights_only=False)
    assert (
        saved["config"]["run"]["output_dir"] == str(run_a) and saved["config"]["method"]["temperature"] == 0.2
    )
    assert json.loads((shared / ".lease").read_text())["pid"] == a.pid  # left behind by the kill
    end = int(newest.removeprefix("step-")) + 2
    assert (
        _train_here([*_overrides(tiny, tiny, run_b, *common), "train.epochs=500", f"train.max_steps={end}"])
        == 0
    )
    assert f"resumed from {shared / newest}" in capsys.readouterr().out  # A's newest step, continued by B
    assert not (shared / ".lease").exists() and step_rows(run_b)[-1]["step"] == end


def test_checkpoint_lease_on_s3_expiry_takeover_and_a_lost_lease(s3_server, tmp_path: Path):
    """On an object store (moto on loopback): a live holder refuses another run; an expired lease of
    another host is taken over; a holder whose lease was taken while it was paused writes no checkpoint."""
    from pipeline.engine.checkpoint import CheckpointError, CheckpointStore
    from pipeline.engine.runlock import LEASE_FILE, CheckpointLease, RunFolderBusy

    s3_server.make_bucket("lease")
    root = "s3://lease/run/checkpoints"
    store = CheckpointStore(root)
    a = CheckpointLease(root, "/runs/a").acquire(settle_s=0)
    with pytest.raises(RunFolderBusy, match=r"in use by another training \(run.output_dir /runs/a, pid"):
        CheckpointLease(root, "/runs/b").acquire(settle_s=0)
    a.release()
    assert not store.fs.exists(f"lease/run/checkpoints/{LEASE_FILE}")

    expired = {"holder": "/runs/c", "host": "elsewhere", "pid": 1, "expires": time.time() - 1}
    store.fs.pipe_file(f"lease/run/checkpoints/{LEASE_FILE}", json.dumps(expired).encode())
    d = CheckpointLease(root, "/runs/d").acquire(settle_s=0)
    store.before_commit = d.verify
    try:
        store.save(1, {"step": 1})  # renews the lease, then writes
        alive = {**expired, "expires": time.time() + 600}  # c came back while d was paused
        store.fs.pipe_file(f"lease/run/checkpoints/{LEASE_FILE}", json.dumps(alive).encode())
        with pytest.raises(CheckpointError, match="was taken over by another training"):
            store.save(2, {"step": 2})
        assert store.complete_steps() == [1]
    finally:
        d.release()
    assert json.loads(store.fs.cat_file(f"lease/run/checkpoints/{LEASE_FILE}"))["holder"] == "/runs/c"


# ------------------------------------------------------------ 3. SwAV's queue, checked at load and launch

SWAV = ["method.name=swav", "method.num_prototypes=16", "method.freeze_prototypes_steps=0", NO_WANDB]


def test_swav_queue_not_a_multiple_of_the_batch_is_refused_at_load(tiny: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    assert _train_here([*_overrides(tiny, tiny, out, *SWAV), "method.queue_size=17"]) == 2
    line = _last_err_line(capsys)
    assert "method.queue_size=17 must be a multiple of the global batch 16" in line and not out.exists()


@pytest.mark.slow
def test_swav_resumes_under_two_ranks_with_a_new_batch_size(tiny: Path, tmp_path: Path):
    """One process at batch 16 fills a third of a 48-row queue; two gloo ranks at batch 12 (global 24)
    resume it: the queue goes on from the top instead of writing past its end (was: a shape error at the
    first step, after config.yaml was rewritten). Two ranks at batch 16 are refused at launch."""
    out = tmp_path / "run"
    common = _overrides(tiny, tiny, out, *SWAV, "method.queue_size=48", "checkpoint.every_steps=1")
    assert _train_here([*common, "train.max_steps=1"]) == 0
    resumed = subprocess.run(
        _train_cmd([*common, "data.batch_size=12", "train.max_steps=4"], nproc=2),
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resume: data.batch_size: 16 -> 12" in resumed.stdout
    assert [r["step"] for r in step_rows(out)] == [1, 2, 3, 4] and checkpoint_step(out) == 4
    state = torch.load(out / "checkpoints" / "step-00000004" / "state.pt", weights_only=False)
    # rows [16, 40) at step 2; 40 + 24 > 48, so steps 3 and 4 write [0, 24) and [24, 48): full again
    assert bool(state["model"]["queue_full"]) and int(state["model"]["queue_ptr"]) == 0
    # What each rank checks at launch, before the run folder: 48 rows are not a whole number of global
    # batches of 2 x 16 (one process at 16 would be).
    from pipeline.config import check_launch, load

    cfg = load(ROOT / "configs" / "debug.yaml", [*common, "data.batch_size=16"])
    with pytest.raises(ConfigError, match=r"global batch 32 \(data.batch_size=16 x 2 processes\)"):
        check_launch(cfg, world_size=2, device_type="cpu")


# ------------------------------------------------------------ 5. impossible data configs, before any work


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        (["data.image_size=1"], "data.image_size"),
        (["data.recipe=multicrop", "data.global_crops=1"], "data.global_crops=1"),
        (["data.recipe=multicrop", "data.local_image_size=32"], "data.local_image_size=32"),
        (["data.dtype=float16"], "data.dtype=float16"),  # the debug config's fp32
        (["data.dtype=float16", "train.precision=auto"], "data.dtype=float16"),  # auto is fp32 on the CPU
        (
            [*SWAV, "method.queue_size=32", "data.recipe=multicrop", "data.global_crops=3"],
            "method.queue_size",
        ),
    ],
)
def test_impossible_data_configs_are_refused_before_the_run_folder(
    extra: list[str], key: str, tiny: Path, tmp_path: Path, capsys
):
    out = tmp_path / "run"
    assert _train_here([*_overrides(tiny, tiny, out, NO_WANDB), *extra]) == 2
    line = _last_err_line(capsys)
    assert key in line and line.startswith("config error:") and not out.exists()


def test_float16_added_on_resume_is_refused_before_anything_is_written(tiny: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    common = _overrides(tiny, tiny, out, NO_WANDB, "train.max_steps=2")
    assert _train_here(common) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert _train_here([*common, "train.max_steps=4", "data.dtype=float16", "train.precision=auto"]) == 2
    assert "data.dtype=float16" in _last_err_line(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert checkpoint_step(out) == 2


# ------------------------------------------------------------------ 6. DeepSpeed JSON of the wrong shape


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('{"zero_optimization": true}', "zero_optimization in"),
        ("[1, 2]", "holds a JSON list"),
        ('{"zero_optimization": {"stage": "1"}}', 'stage in {path} is "1"'),
        ('{"zero_optimization": {"stage": true}}', "stage in {path} is true"),
        ('{"zero_optimization": {"stage": 3}}', "stage in {path} is 3"),
    ],
)
def test_deepspeed_json_of_the_wrong_shape_is_refused_in_one_line(
    text: str, says: str, tiny: Path, tmp_path: Path, capsys
):
    path = tmp_path / "ds.json"
    path.write_text(text)
    out = tmp_path / "run"
    argv = [
        *_overrides(tiny, tiny, out, NO_WANDB),
        "train.engine=deepspeed",
        f"train.deepspeed_config={path}",
    ]
    assert _train_here(argv) == 2
    line = _last_err_line(capsys)
    assert line.startswith("config error: train.deepspeed_config:") and says.format(path=path) in line
    assert not out.exists()


# ------------------------------------------------------------------ 9. smaller ones


def _lock_fault(kind: str, out: Path) -> None:
    out.mkdir()
    if kind == "a directory":
        (out / ".lock").mkdir()
    elif kind == "a dangling symlink":
        (out / ".lock").symlink_to(out / "gone" / "lock")
    else:
        (out / ".lock").touch()
        if subprocess.run(["chattr", "+i", str(out / ".lock")], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available on this filesystem")


@pytest.mark.parametrize("kind", ["a directory", "a dangling symlink", "immutable"])
def test_a_faulty_lock_file_is_named(kind: str, tiny: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    _lock_fault(kind, out)
    try:
        assert _train_here(_overrides(tiny, tiny, out, NO_WANDB)) == 2
        line = _last_err_line(capsys)
        assert f"its lock file {out / '.lock'} cannot be opened or locked" in line, line
        assert not (out / "config.yaml").exists()
    finally:
        subprocess.run(["chattr", "-i", str(out / ".lock")], capture_output=True)


def test_switching_to_deepspeed_on_resume_is_refused_before_building_the_engine(tiny: Path, tmp_path: Path):
    out = tmp_path / "run"
    common = _overrides(tiny, tiny, out, NO_WANDB, "train.max_steps=2")
    assert _train_here(common) == 0
    argv = ["--config", str(ROOT / "configs" / "debug.yaml"), *common, "train.engine=deepspeed"]
    probe = (
        "import sys; from pipeline.train import main; code = main(sys.argv[1:]); "
        "print(code, 'pipeline.engine.deepspeed_engine' in sys.modules, 'deepspeed' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *argv],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.split() == ["2", "False", "False"], done.stderr[-2000:]
    assert "train.engine is 'ddp' there, 'deepspeed' here" in done.stderr


@pytest.mark.parametrize(
    ("method", "key"),
    [
        ("{name: dino, out_dim: 1}", "method.out_dim"),
        ("{name: swav, num_prototypes: 1}", "method.num_prototypes"),
    ],
)
def test_a_single_output_class_is_refused(method: str, key: str, tiny: Path, tmp_path: Path, capsys):
    """A softmax over one logit is 1: DINO with out_dim=1 and SwAV with one prototype trained a loss of 0."""
    out = tmp_path / "run"
    assert _train_here([*_overrides(tiny, tiny, out, NO_WANDB), f"method={method}"]) == 2
    assert f"{key} must be >= 2, got 1" in _last_err_line(capsys) and not out.exists()


def test_resuming_a_finished_run_says_so(tiny: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    common = _overrides(tiny, tiny, out, NO_WANDB, "train.max_steps=2")
    assert _train_here(common) == 0
    capsys.readouterr()
    assert _train_here(common) == 0
    stdout = capsys.readouterr().out
    assert "the run is finished (step 2 is its last step); nothing to do" in stdout
    assert "without a stop checkpoint" not in stdout and [r["step"] for r in step_rows(out)] == [1, 2]
    assert _train_here([*_overrides(tiny, tiny, out, NO_WANDB, "train.max_steps=3")]) == 0
    assert "at step 2 (the run before reached its train.max_steps)" in capsys.readouterr().out


# ------------------------------------------------------------ 7. side tools: k8s render -o, bench --help

K8S = ["render", "--gpus-per-node", "8", "--image", "registry.example.com/ssl:0.1.0"]
K8S += ["--config", "configs/debug.yaml", "--nodes", "2"]


@pytest.mark.parametrize("where", ["missing folder", "a directory"])
def test_k8s_render_output_path_is_checked_first(where: str, tmp_path: Path, capsys):
    from launch.k8s.__main__ import main as k8s_main

    target = tmp_path / "missing" / "job.yaml" if where == "missing folder" else tmp_path
    assert k8s_main([*K8S, "-o", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: -o {target}") and err.count("\n") == 1
    assert not (tmp_path / "missing").exists() and list(tmp_path.iterdir()) == []


def test_bench_help_exits_zero():
    done = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m bench {prep,")


# ------------------------------------------------------------------ 8. credentials in k8s manifests

GITHUB = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
AZURE = "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=c2VjcmV0a2V5c2VjcmV0a2V5;"


@pytest.mark.parametrize(
    "argv",
    [
        ["--env", "GITHUB_PAT=not-shaped-like-a-token"],  # by name
        ["--env", "WANDB_KEY=0123456789abcdef"],
        ["--env", "HF_AUTH=hunter2hunter2"],
        ["--env", f"AZURE_STORAGE_CONNECTION_STRING={AZURE}"],
        ["--env", f"INNOCENT={GITHUB}"],  # by shape
        ["--env", "SLACK=xoxb-123456789012-abcdefghijkl"],
        ["--env", "BUCKET_ID=AKIAIOSFODNN7EXAMPLE"],
        ["--env", f"CONN={AZURE}"],
        ["--set", "data.train_shards=https://acct.blob.core.windows.net/c?sv=2022-11-02&sig=c2lnbmF0dXJl"],
        ["--set", "data.train_shards=https://host/shards?token=c2lnbmF0dXJl"],
        ["--set", f"run.name=hf_{'x' * 34}"],
    ],
)
def test_credentials_by_name_or_shape_are_refused_and_never_echoed(argv: list[str], tmp_path: Path, capsys):
    from launch.k8s.__main__ import main as k8s_main

    target = tmp_path / "job.yaml"
    assert k8s_main([*K8S, *argv, "-o", str(target)]) == 2
    err = capsys.readouterr().err
    assert not target.exists() and err.count("\n") == 1 and "--secret-env" in err
    secret = argv[1].split("=", 1)[1]
    assert secret[-8:] not in err


def test_the_header_is_redacted_and_secret_env_takes_a_bare_name(capsys):
    from launch.k8s.__main__ import main as k8s_main
    from launch.k8s.secrets import redact_argv

    argv = ["--image", f"registry.example.com/ssl:{GITHUB}", "--env", "GH_PAT=x", "--env=HF_AUTH=y"]
    argv += ["--config", "https://u:hunter2@h/c.yaml?X-Amz-Signature=abc&sig=def"]
    assert redact_argv(argv) == [
        "--image", "registry.example.com/ssl:<redacted>", "--env", "GH_PAT=<redacted>",
        "--env=HF_AUTH=<redacted>", "--config", "https://u:<redacted>@h/c.yaml?X-Amz-Signature=<redacted>&sig=<redacted>",
    ]  # fmt: skip
    assert k8s_main([*K8S, "--secret-env", "HF_TOKEN"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    env = {e["name"]: e for c in _containers(docs) for e in c["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}


def _containers(docs: list[dict]) -> list[dict]:
    return [
        c for d in docs if d and d.get("kind") == "Job" for c in d["spec"]["template"]["spec"]["containers"]
    ]


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]


def _running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has exited; only its parent has not reaped it


def test_streamed_workers_end_with_their_trainer_on_sigkill(tiny: Path, tmp_path: Path):
    """SIGKILL of a streamed run (torch backend, 2 DataLoader workers): the workers end within a second,
    not ~8 s later when the DataLoader's parent check runs."""
    out = tmp_path / "run"
    extra = ["data.backend=torch", "data.source=stream", "data.num_workers=2", "train.max_steps=null"]
    cmd = _train_cmd([*_overrides(tiny, tiny, out, NO_WANDB, *extra), "train.epochs=500"])
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    trainer = subprocess.Popen(cmd, cwd=ROOT, env=_env(), **quiet)
    try:
        _wait_for(lambda: (out / "metrics.jsonl").is_file() and len(_children(trainer.pid)) >= 2, trainer)
        workers = _children(trainer.pid)
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
    killed = time.monotonic()
    while any(_running(w) for w in workers) and time.monotonic() - killed < 10:
        time.sleep(0.05)
    assert not any(_running(w) for w in workers) and time.monotonic() - killed < 1.5
