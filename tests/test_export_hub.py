"""Hub-ready export on real one-step checkpoints: `--format hf` writes model.safetensors, config.json and a
model card that `timm.create_model("local-dir:...", pretrained=True)` loads with the training
preprocessing; `--format timm` carries the same pretrained_cfg; impossible formats and outputs are refused
in one line (exit 2) with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from torchvision.transforms import v2

from pipeline.data.recipes import IMAGENET_MEAN, IMAGENET_STD
from pipeline.eval.__main__ import main as eval_main
from pipeline.eval.features import load_backbone
from pipeline.export import main as export_main

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = {
    "resnet18": ["model.backbone=resnet18", "model.cifar_stem=false"],
    "vit_tiny": [
        "model.backbone=vit_tiny",
        "model.cifar_stem=false",
        "model.image_size=32",
        "model.patch_size=8",
    ],
    "tiny": [],  # configs/debug.yaml's CIFAR-stem `tiny`
}


def _train_one_step(out: Path, shards: Path, val_shards: Path, backbone: str) -> Path:
    from pipeline.train import main

    argv = ["--config", str(ROOT / "configs" / "debug.yaml"), f"data.train_shards={shards}"]
    argv += [f"data.val_shards={val_shards}", f"run.output_dir={out}", "train.max_steps=1"]
    argv += ["logging.progress_bar=false", *BACKBONES[backbone]]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_shards, sample_val_shards) -> dict[str, Path]:
    """One-step runs per backbone; the ResNet-18 one also has a kNN result for its model card."""
    made = {
        name: _train_one_step(tmp_path_factory.mktemp(name), sample_shards, sample_val_shards, name)
        for name in BACKBONES
    }
    knn = ["knn", "--checkpoint", str(made["resnet18"]), "--k", "10", "--batch-size", "250"]
    assert eval_main([*knn, "--train-shards", str(sample_val_shards)]) == 0  # a small bank: fast
    return made


def _sample_image() -> Image.Image:
    return Image.open(next((ROOT / "sample_data" / "cifar10_mini" / "val").rglob("*.jpg"))).convert("RGB")


@pytest.mark.parametrize("backbone", ["resnet18", "vit_tiny"])
def test_hf_folder_loads_in_timm_with_the_training_preprocessing(runs, tmp_path, backbone, capsys):
    hub = tmp_path / "hub"
    assert export_main(["--checkpoint", str(runs[backbone]), "--format", "hf", "--out", str(hub)]) == 0
    assert sorted(p.name for p in hub.iterdir()) == [
        "README.md",
        "config.json",
        "export.json",
        "model.safetensors",
    ]
    config = json.loads((hub / "config.json").read_text())
    assert config["num_classes"] == 0 and "hf_hub_id" not in config["pretrained_cfg"]
    assert "tag" not in config["pretrained_cfg"]  # not timm's ImageNet weights

    model = timm.create_model(f"local-dir:{hub}", pretrained=True).eval()
    ours = load_backbone(str(runs[backbone])).module
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), ours(images))  # the trained weights, not random ones

    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg == {
        "input_size": (3, 32, 32),
        "interpolation": "bilinear",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    # timm's transform from that config against pipeline.data.eval's (resize, centre crop, normalise)
    image = _sample_image()
    ours_t = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(32, antialias=True),
            v2.CenterCrop(32),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    timm_t = timm.data.create_transform(**data_cfg)
    torch.testing.assert_close(timm_t(image), ours_t(image), atol=1e-5, rtol=0)

    card = (hub / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n") and "self-supervised, simclr]" in card
    assert "optimizer steps: 1 " in card and f"{runs[backbone]}" in card
    if backbone == "resnet18":
        knn = json.loads((runs[backbone] / "eval" / "knn-pretrained.json").read_text())
        assert f"| knn | resnet18 pretrained | {100 * knn['top1']:.2f} |" in card
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["out"] == str(hub) and printed["step"] == 1


def test_timm_file_carries_the_pretrained_cfg_its_rebuild_code_sets(runs, tmp_path):
    out = tmp_path / "r18.pt"
    assert export_main(["--checkpoint", str(runs["resnet18"]), "--format", "timm", "--out", str(out)]) == 0
    meta = json.loads(out.with_suffix(".pt.json").read_text())
    assert meta["pretrained_cfg"]["input_size"] == [3, 32, 32] and meta["pretrained_cfg"]["num_classes"] == 0
    scope = {"torch": torch, "timm": timm, "FILE": out}
    exec(meta["rebuild"], scope)
    model = scope["m"]
    assert model.pretrained_cfg.get("hf_hub_id") is None  # timm.create_model gives "timm/resnet18.a1_in1k"
    data_cfg = timm.data.resolve_data_config({}, model=model)
    got = (tuple(data_cfg["input_size"]), tuple(data_cfg["mean"]), data_cfg["crop_pct"])
    assert got == ((3, 32, 32), IMAGENET_MEAN, 1.0)


@pytest.mark.parametrize(
    ("backbone", "fmt", "out", "message"),
    [
        ("tiny", "torchvision", "x.pt", "--format torchvision: torchvision has no 'tiny' model; use timm"),
        ("tiny", "hf", "hub", "--format hf: 'tiny' has no registered timm architecture"),
        ("resnet18", "timm", "a_folder", "is a folder; name the .pt file to write"),
        ("resnet18", "hf", "full_folder", "exists and is not an empty folder"),
        ("resnet18", "timm", "missing/x.pt", "the folder"),
    ],
)
def test_refusals_are_one_line_exit_2_and_write_nothing(runs, tmp_path, capsys, backbone, fmt, out, message):
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "full_folder").mkdir()
    (tmp_path / "full_folder" / "keep.txt").write_text("mine")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    target = tmp_path / out
    assert export_main(["--checkpoint", str(runs[backbone]), "--format", fmt, "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pipeline.export: ") and message in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no folder created
    if out == "missing/x.pt":
        assert f"the folder {tmp_path / 'missing'} does not exist" in err
