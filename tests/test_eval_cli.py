"""`python -m pipeline.eval` and `python -m pipeline.export` on a real checkpoint: two steps of the debug
config (the `tiny` CIFAR-stem ResNet) trained from the sample shards, then every eval command and the export
round trip. (ResNet-18/50 export to both formats is tested without a run in test_export.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.eval.__main__ import main as eval_main
from pipeline.eval.features import load_backbone
from pipeline.export import main as export_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, sample_shards, sample_val_shards) -> Path:
    """Trained by the CLI's main in this process: a fresh interpreter importing torch costs more than the
    two steps."""
    from pipeline.train import main as train_main

    out = tmp_path_factory.mktemp("eval_run")
    argv = ["--config", str(ROOT / "configs" / "debug.yaml"), f"data.train_shards={sample_shards}"]
    argv += [f"data.val_shards={sample_val_shards}", f"run.output_dir={out}", "train.max_steps=2"]
    assert train_main([*argv, "logging.progress_bar=false"]) == 0
    return out


@pytest.mark.slow  # features of 4,000 images through the CLI
def test_knn_linear_embed_report(run_dir, sample_val_shards, capsys):
    assert eval_main(["knn", "--checkpoint", str(run_dir), "--k", "20", "--batch-size", "250"]) == 0
    knn = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert knn["protocol"] == "knn" and 0.0 <= knn["top1"] <= knn["top5"] <= 1.0
    assert knn["details"] == {"k": 20, "temperature": 0.1}
    # A checkpoint STEP folder resolves to the same run folder's eval/ output.
    step = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    # --train-shards: the probe trains on the 500 val images here, only to keep the test fast.
    argv = ["linear", "--checkpoint", str(step), "--epochs", "5", "--lrs", "0.1", "--weight-decays", "0"]
    argv += ["--train-shards", str(sample_val_shards), "--random-init", "--batch-size", "250"]
    assert eval_main(argv) == 0
    linear = json.loads((run_dir / "eval" / "linear-random.json").read_text())
    assert linear["backbone"] == "tiny random init" and linear["details"]["lr"] == 0.1
    argv = ["embed", "--checkpoint", str(run_dir), "--method", "pca", "--batch-size", "250"]
    assert eval_main(argv) == 0
    png = run_dir / "eval" / "embedding_map-pca-pretrained.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert eval_main(["report", "--checkpoint", str(run_dir)]) == 0
    md = (run_dir / "eval" / "report.md").read_text()
    assert "| knn | tiny pretrained |" in md and "| linear | tiny random init |" in md
    assert "embedding_map-pca-pretrained.png" in md and "backbone: tiny" in md
    assert (run_dir / "eval" / "report.html").stat().st_size > 10_000  # images inlined


def test_finetune_on_a_label_subset(run_dir, tmp_path):
    argv = ["finetune", "--checkpoint", str(run_dir), "--out", str(tmp_path), "--epochs", "1"]
    assert eval_main([*argv, "--label-fractions", "0.05", "--batch-size", "50"]) == 0
    row = json.loads((tmp_path / "finetune-0.05-pretrained.json").read_text())
    assert row["details"]["train_samples"] == 100  # 5% of each class's 200 samples, 10 classes
    assert 0.0 <= row["top1"] <= row["top5"] <= 1.0


def test_export_round_trip_gives_identical_features(run_dir, tmp_path):
    out = tmp_path / "backbone.pt"
    assert export_main(["--checkpoint", str(run_dir), "--format", "timm", "--out", str(out)]) == 0
    meta = json.loads(out.with_suffix(".pt.json").read_text())
    assert meta["cifar_stem"] is True and meta["feature_dim"] == 128
    # Rebuild with library calls only, as FILE.json's recipe says.
    import timm

    stock = timm.models.resnet.ResNet(
        timm.models.resnet.BasicBlock, (1, 1, 1, 1), channels=(16, 32, 64, 128), num_classes=0
    )
    stock.conv1 = torch.nn.Conv2d(3, stock.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    stock.maxpool = torch.nn.Identity()
    stock.load_state_dict(torch.load(out, weights_only=True))
    ours = load_backbone(str(run_dir)).module
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(stock.eval()(images), ours.eval()(images), rtol=1e-5, atol=1e-5)
    # refused in one line, exit 2 (tests/test_export_hub.py)
    assert export_main(["--checkpoint", str(run_dir), "--format", "torchvision", "--out", str(out)]) == 2
