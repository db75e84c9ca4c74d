"""`python -m pipeline.export --checkpoint CKPT --format torchvision|timm --out FILE`

Writes the pretrained online backbone as a plain state dict (torch.save of a dict of tensors) that loads
into a stock torchvision or timm model with no code of ours, plus FILE.json saying how to rebuild it.

  import torch, torchvision
  m = torchvision.models.resnet50()
  m.fc = torch.nn.Identity()                       # features, not ImageNet logits
  m.load_state_dict(torch.load("r50.pt"))          # m(images) -> (B, 2048)

  import timm
  m = timm.create_model("resnet50", num_classes=0) # num_classes=0: pooled features
  m.load_state_dict(torch.load("r50_timm.pt"))

ViTs export to timm only (with their img_size/patch_size); the CPU `tiny` backbone to timm's ResNet class.
FILE.json's "rebuild" holds the exact lines for the exported model.

A CIFAR-stem backbone (model.cifar_stem: 3x3 stride-1 conv1, no max-pool, for 32 px images) needs the
same two stem changes on the stock model before loading; the keys are otherwise identical:

  m.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
  m.maxpool = torch.nn.Identity()
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.engine.checkpoint import CheckpointError
from pipeline.models.backbone import TIMM_VITS, TINY_BLOCKS, TINY_CHANNELS, TORCHVISION_RESNETS

FORMATS = ("torchvision", "timm")
# `tiny` has no registered timm name, so it is rebuilt from timm's ResNet class directly.
TINY_TIMM = (
    f"timm.models.resnet.ResNet(timm.models.resnet.BasicBlock, {TINY_BLOCKS}, channels={TINY_CHANNELS}, "
    "num_classes=0)"
)


def rebuild_code(model_cfg: Any, fmt: str) -> str:
    """The Python lines (torch, torchvision, timm only) that build the stock model for `model_cfg`."""
    arch = model_cfg.backbone
    if fmt == "torchvision":
        if arch not in TORCHVISION_RESNETS:
            raise ValueError(f"--format torchvision supports {TORCHVISION_RESNETS}, not {arch!r}; use timm")
        code = f"m = torchvision.models.{arch}(); m.fc = torch.nn.Identity()"
    elif fmt == "timm":
        if arch == "tiny":
            code = f"m = {TINY_TIMM}"
        elif arch in TIMM_VITS:
            size = f"img_size={model_cfg.image_size}, patch_size={model_cfg.patch_size}"
            code = f"m = timm.create_model({TIMM_VITS[arch]!r}, num_classes=0, {size})"
        else:
            code = f"m = timm.create_model({arch!r}, num_classes=0)"
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if model_cfg.cifar_stem:
        code += (
            "; m.conv1 = torch.nn.Conv2d(3, m.conv1.out_channels, kernel_size=3, stride=1, padding=1, "
            "bias=False)"
            "; m.maxpool = torch.nn.Identity()"
        )
    return code


def stock_model(model_cfg: Any, fmt: str) -> nn.Module:
    """The stock torchvision/timm feature extractor the export loads into, built by running exactly the
    code written into FILE.json, so the recipe users get is the one tested."""
    import timm
    import torchvision

    scope = {"torch": torch, "torchvision": torchvision, "timm": timm}
    exec(rebuild_code(model_cfg, fmt), scope)
    return scope["m"]


def _match_keys(ours: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our backbone's state dict renamed to the stock model's keys: our module may wrap the stock one
    (e.g. `net.layer1...`), so strip the one leading prefix that makes every key match."""
    prefixes = ["", *sorted({k.split(".", 1)[0] + "." for k in ours if "." in k})]
    for prefix in prefixes:
        renamed = {k[len(prefix) :]: v for k, v in ours.items() if k.startswith(prefix)}
        if len(renamed) == len(ours) and set(renamed) == set(target):
            bad = [k for k, v in renamed.items() if v.shape != target[k].shape]
            if bad:
                raise ValueError(f"shape mismatch against the stock model for {bad[:5]}")
            return renamed
    raise ValueError(
        f"backbone keys do not match the stock model: ours start {sorted(ours)[:3]}, "
        f"the stock model's {sorted(target)[:3]}"
    )


def export_backbone(checkpoint: str, fmt: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(plain state dict for the stock model, metadata with the rebuild recipe)."""
    from pipeline.eval.features import load_backbone

    backbone = load_backbone(checkpoint)
    model_cfg = backbone.config.model
    ours = {k: v.detach().cpu().clone() for k, v in backbone.module.state_dict().items()}
    state = _match_keys(ours, stock_model(model_cfg, fmt).state_dict())
    meta = {
        "format": fmt,
        "backbone": model_cfg.backbone,
        "cifar_stem": model_cfg.cifar_stem,
        "feature_dim": backbone.feature_dim,
        "image_size": backbone.config.data.image_size,
        "checkpoint": checkpoint,
        "rebuild": rebuild_code(model_cfg, fmt) + "; m.load_state_dict(torch.load(FILE))",
    }
    return state, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir, step dir or state.pt")
    parser.add_argument("--format", choices=FORMATS, default="torchvision")
    parser.add_argument("--out", required=True, help="output .pt file (FILE.json gets the rebuild recipe)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:  # refuse before loading anything
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError as e:
        print(
            f"pipeline.export: --out {out} is not writable ({e.strerror}); choose another --out",
            file=sys.stderr,
        )
        return 2
    try:  # a damaged newest step falls back to the previous one, with a warning
        state, meta = export_backbone(args.checkpoint, args.format)
    except CheckpointError as e:  # missing, or no intact step
        print(f"pipeline.export: {e}", file=sys.stderr)
        return 2
    torch.save(state, out)
    out.with_suffix(out.suffix + ".json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps({"out": str(out), **meta}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
