"""`python -m pipeline.export --checkpoint CKPT --format torchvision|timm|hf --out FILE|FOLDER`

Writes the pretrained online backbone as a plain state dict (torch.save of a dict of tensors) that loads
into a stock torchvision or timm model with no code of ours, plus FILE.json saying how to rebuild it and
(timm) the `pretrained_cfg` that preprocesses its inputs as training did. `--format hf` writes a folder
for timm and the Hugging Face Hub instead: model.safetensors, config.json and a model card (README.md):

  m = timm.create_model("local-dir:FOLDER", pretrained=True)     # or "hf-hub:USER/REPO" once pushed
  t = timm.data.create_transform(**timm.data.resolve_data_config({}, model=m))

  import torch, torchvision
  m = torchvision.models.resnet50()
  m.fc = torch.nn.Identity()                       # features, not ImageNet logits
  m.load_state_dict(torch.load("r50.pt"))          # m(images) -> (B, 2048)

  import timm
  m = timm.create_model("resnet50", num_classes=0) # num_classes=0: pooled features
  m.load_state_dict(torch.load("r50_timm.pt"))

ViTs export to timm only (with their img_size/patch_size); the CPU `tiny` backbone to timm's ResNet class.
FILE.json's "rebuild" holds the exact lines for the exported model. `hf` needs a registered timm
architecture: not `tiny`, not a CIFAR stem (timm has no 3x3 stride-1 ResNet stem); those are refused.

A CIFAR-stem backbone (model.cifar_stem: 3x3 stride-1 conv1, no max-pool, for 32 px images) needs the
same two stem changes on the stock model before loading; the keys are otherwise identical:

  m.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
  m.maxpool = torch.nn.Identity()
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.engine.checkpoint import CheckpointError
from pipeline.models.backbone import TIMM_VITS, TINY_BLOCKS, TINY_CHANNELS, TORCHVISION_RESNETS

FORMATS = ("torchvision", "timm", "hf")
# `tiny` has no registered timm name, so it is rebuilt from timm's ResNet class directly.
TINY_TIMM = (
    f"timm.models.resnet.ResNet(timm.models.resnet.BasicBlock, {TINY_BLOCKS}, channels={TINY_CHANNELS}, "
    "num_classes=0)"
)


# pretrained_cfg fields of timm's ImageNet weights that misdescribe ours (null: left out of config.json).
IMAGENET_WEIGHTS_FIELDS = (
    "hf_hub_id",
    "tag",
    "origin_url",
    "paper_ids",
    "license",
    "test_input_size",
    "test_crop_pct",
    "pool_size",
)


class ExportRefused(ValueError):
    """A format the checkpoint's backbone cannot be written in, or an --out that cannot take it."""


def check_format(model_cfg: Any, fmt: str) -> None:
    """Refuse a backbone/format pair that has no stock model, naming the way out."""
    arch = model_cfg.backbone
    if fmt == "torchvision" and arch not in TORCHVISION_RESNETS:
        raise ExportRefused(
            f"--format torchvision: torchvision has no {arch!r} model; use timm (--format timm)"
        )
    if fmt == "hf" and arch == "tiny":
        raise ExportRefused(
            "--format hf: 'tiny' has no registered timm architecture to load by name; use --format timm "
            "(FILE.json holds the rebuild code)"
        )
    if fmt == "hf" and model_cfg.cifar_stem:
        raise ExportRefused(
            f"--format hf: timm has no {arch} with a CIFAR stem (3x3 stride-1 conv1, no max-pool) to load "
            "by name; use --format timm or torchvision (FILE.json holds the stem change)"
        )
    if fmt not in FORMATS:
        raise ExportRefused(f"--format must be one of {FORMATS}, got {fmt!r}")


def pretrained_cfg(cfg: Any) -> dict[str, Any]:
    """timm's preprocessing fields for the exported backbone: what `python -m pipeline.eval` feeds it
    (pipeline.data.eval: shorter side to image_size, or image_size / 0.875 above 64 px, bilinear, centre
    crop, ImageNet mean/std), so `timm.data.resolve_data_config` gives the same transform."""
    from pipeline.data.recipes import IMAGENET_MEAN, IMAGENET_STD

    size = cfg.data.image_size
    resize = size if size <= 64 else round(size / 0.875)
    return {
        "input_size": [3, size, size],
        "interpolation": "bilinear",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "crop_pct": size / resize,
        "crop_mode": "center",
        "num_classes": 0,
    }


def rebuild_code(model_cfg: Any, fmt: str, preprocessing: dict[str, Any] | None = None) -> str:
    """The Python lines (torch, torchvision, timm only) that build the stock model for `model_cfg`; for
    timm, with `preprocessing` as its pretrained_cfg (the ImageNet model's otherwise)."""
    check_format(model_cfg, fmt)
    arch = model_cfg.backbone
    # The stock model's own pretrained_cfg describes timm's ImageNet weights: clear what names them.
    preprocessing = {**dict.fromkeys(IMAGENET_WEIGHTS_FIELDS), **preprocessing} if preprocessing else None
    overlay = f", pretrained_cfg_overlay={preprocessing!r}" if preprocessing else ""
    if fmt == "torchvision":
        code = f"m = torchvision.models.{arch}(); m.fc = torch.nn.Identity()"
    elif arch == "tiny":
        code = f"m = {TINY_TIMM}"
        if preprocessing:
            code += f"; m.pretrained_cfg = {preprocessing!r}"
    elif arch in TIMM_VITS:
        size = f"img_size={model_cfg.image_size}, patch_size={model_cfg.patch_size}"
        code = f"m = timm.create_model({TIMM_VITS[arch]!r}, num_classes=0, {size}{overlay})"
    else:
        code = f"m = timm.create_model({arch!r}, num_classes=0{overlay})"
    if model_cfg.cifar_stem:
        code += (
            "; m.conv1 = torch.nn.Conv2d(3, m.conv1.out_channels, kernel_size=3, stride=1, padding=1, "
            "bias=False)"
            "; m.maxpool = torch.nn.Identity()"
        )
    return code


def stock_model(model_cfg: Any, fmt: str, preprocessing: dict[str, Any] | None = None) -> nn.Module:
    """The stock torchvision/timm feature extractor the export loads into, built by running exactly the
    code written into FILE.json, so the recipe users get is the one tested."""
    import timm
    import torchvision

    scope = {"torch": torch, "torchvision": torchvision, "timm": timm}
    exec(rebuild_code(model_cfg, "timm" if fmt == "hf" else fmt, preprocessing), scope)
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


def export_backbone(checkpoint: str, fmt: str) -> tuple[nn.Module, dict[str, Any]]:
    """(the stock model holding the checkpoint's backbone weights, metadata with the rebuild recipe)."""
    from pipeline.engine.checkpoint import find_state
    from pipeline.eval.features import load_backbone

    backbone = load_backbone(checkpoint)
    cfg = backbone.config
    check_format(cfg.model, fmt)
    preprocessing = pretrained_cfg(cfg) if fmt != "torchvision" else None
    model = stock_model(cfg.model, fmt, preprocessing)
    ours = {k: v.detach().cpu().clone() for k, v in backbone.module.state_dict().items()}
    model.load_state_dict(_match_keys(ours, model.state_dict()))
    step_dir, _ = find_state(checkpoint, warn=lambda _: None)  # the step load_backbone fell back to, if any
    meta = {
        "format": fmt,
        "backbone": cfg.model.backbone,
        "cifar_stem": cfg.model.cifar_stem,
        "feature_dim": backbone.feature_dim,
        "image_size": cfg.data.image_size,
        "checkpoint": checkpoint,
        "step": int(step_dir.rstrip("/").rsplit("-", 1)[-1]),
        "method": cfg.method.name,
        "train_shards": cfg.data.train_shards,
        **({"pretrained_cfg": preprocessing} if preprocessing else {}),
        "rebuild": rebuild_code(cfg.model, "timm" if fmt == "hf" else fmt, preprocessing)
        + "; m.load_state_dict(torch.load(FILE))",
    }
    return model, meta


def check_out(out: Path, fmt: str) -> None:
    """Refuse an --out that would overwrite a folder, create missing folders or not be writable."""
    if not out.parent.exists():  # a file in its place fails the write probe below
        raise ExportRefused(
            f"--out {out}: the folder {out.parent} does not exist; create it or choose another"
        )
    if fmt == "hf":
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ExportRefused(
                f"--out {out} exists and is not an empty folder; name a new folder for --format hf"
            )
    elif out.is_dir():
        raise ExportRefused(
            f"--out {out} is a folder; name the .pt file to write (e.g. {out / 'backbone.pt'})"
        )
    try:
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError as e:
        raise ExportRefused(f"--out {out} is not writable ({e.strerror}); choose another --out") from None


def eval_results(checkpoint: str) -> list[dict[str, Any]]:
    """The run's `python -m pipeline.eval` results (RUN/eval/*.json), [] for a URL or before any eval."""
    from pipeline.eval.__main__ import run_dir_of
    from pipeline.eval.report import read_results

    run_dir = run_dir_of(checkpoint)
    return read_results(run_dir / "eval") if run_dir is not None else []


def model_card(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """README.md for the Hub: what was trained on what, for how long, how it scored, how to load it."""
    size = meta["pretrained_cfg"]["input_size"][1]
    rows = [
        f"| {r['protocol']} | {r.get('backbone', '')} | {100 * r['top1']:.2f} | "
        + (f"{100 * r['top5']:.2f} |" if isinstance(r.get("top5"), float) else "– |")
        for r in results
    ]
    table = ["| protocol | backbone | top-1 % | top-5 % |", "|---|---|---|---|", *rows] if rows else []
    return "\n".join(
        [
            "---",
            "library_name: timm",
            "license: apache-2.0",
            f"tags: [image-feature-extraction, timm, self-supervised, {meta['method']}]",
            "---",
            f"# {meta['backbone']} pretrained with {meta['method']} (self-supervised)",
            "",
            f"- method: {meta['method']}; backbone: {meta['backbone']} ({meta['feature_dim']}-d features)",
            f"- data: {meta['train_shards']} at {size} px",
            f"- optimizer steps: {meta['step']} (checkpoint {meta['checkpoint']})",
            "- preprocessing: `pretrained_cfg` in config.json (the evaluation transform of training)",
            "",
            "## Evaluation",
            "",
            *(table or ["No `python -m pipeline.eval` result was found beside the checkpoint."]),
            "",
            "## Use",
            "",
            "```python",
            "import timm",
            'model = timm.create_model("local-dir:THIS_FOLDER", pretrained=True)  # or "hf-hub:USER/REPO"',
            "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))",
            "features = model(transform(image).unsqueeze(0))  # (1, feature_dim)",
            "```",
            "",
        ]
    )


def write_hub_folder(
    model: nn.Module, meta: dict[str, Any], results: list[dict[str, Any]], out: Path
) -> None:
    """model.safetensors + config.json (timm's own writer) + README.md, made in a temporary folder beside
    `out` and renamed into place: an interrupted export leaves no half-written folder."""
    from timm.models import save_for_hf

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        # config.json from the model's pretrained_cfg and the arguments timm's factory recorded (ViT size)
        save_for_hf(model, str(tmp), safe_serialization=True)
        (tmp / "README.md").write_text(model_card(meta, results))
        (tmp / "export.json").write_text(json.dumps(meta, indent=1) + "\n")
        if out.exists():
            out.rmdir()  # empty (check_out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 written; 2 refused in one line before anything is written (a missing or damaged
    checkpoint, a format its backbone has no stock model for, an --out that is a folder, in a missing
    folder or not writable)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir, step dir or state.pt")
    parser.add_argument("--format", choices=FORMATS, default="torchvision")
    parser.add_argument(
        "--out", required=True, help="output .pt file (FILE.json beside it); a new folder for hf"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        check_out(out, args.format)  # before loading anything
        model, meta = export_backbone(args.checkpoint, args.format)  # a damaged newest step falls back
    except (CheckpointError, ExportRefused) as e:
        print(f"pipeline.export: {e}", file=sys.stderr)
        return 2
    if args.format == "hf":
        write_hub_folder(model, meta, eval_results(args.checkpoint), out)
    else:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        torch.save(state, out)
        out.with_suffix(out.suffix + ".json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps({"out": str(out), **meta}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
