"""Augmentation settings the loader tests share: known pixels in, known pixels out."""

from pipeline.data import AugmentConfig

# Every random op off and a full-image crop: a view is the decoded image, normalised (32 px in, 32 px out).
IDENTITY = AugmentConfig(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    flip_p=0.0,
    jitter_p=0.0,
    grayscale_p=0.0,
    blur_p=(0.0,),
    solarize_p=(0.0,),
)
PLAIN = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # no normalisation: views in [0, 1] pixel units
