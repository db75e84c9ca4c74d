"""Recipes and the `data:` config: names, per-view asymmetry, overrides, errors naming the key."""

from __future__ import annotations

import pytest

from pipeline.data import RECIPES, AugmentConfig, DataConfig, resolve_views
from pipeline.schema import ConfigError, build


def test_simclr_defaults_two_identical_global_views():
    views = resolve_views(DataConfig(train_shards="x"))
    assert len(views) == 2 and views[0] == views[1]
    v = views[0]
    assert (v.size, v.scale, v.jitter_p, v.brightness, v.hue, v.grayscale_p, v.blur_p) == (
        224,
        (0.08, 1.0),
        0.8,
        0.8,
        0.2,
        0.2,
        0.5,
    )
    assert v.blur_kernel == 23  # 10% of 224, odd


def test_byol_views_are_asymmetric():
    g1, g2 = resolve_views(DataConfig(train_shards="x", recipe="byol"))
    assert (g1.blur_p, g1.solarize_p) == (1.0, 0.0)
    assert (g2.blur_p, g2.solarize_p) == (0.1, 0.2)


def test_multicrop_global_and_local_sizes():
    cfg = DataConfig(train_shards="x", recipe="multicrop", image_size=224, local_image_size=96)
    views = resolve_views(cfg)
    assert [v.size for v in views] == [224] * 2 + [96] * 6
    assert views[0].scale == (0.14, 1.0) and views[-1].scale == (0.05, 0.14)
    assert views[-1].blur_kernel == 11  # relative to the local view's own size
    assert (
        len(resolve_views(DataConfig(train_shards="x", recipe="multicrop", local_crops=2, global_crops=3)))
        == 5
    )


def test_overrides_reach_every_view_and_per_view_lists_expand():
    aug = AugmentConfig(crop_scale=(0.5, 1.0), hue=0.0, blur_p=(0.0,), solarize_p=(0.0, 0.3), mean=(0.5,) * 3)
    views = resolve_views(
        DataConfig(train_shards="x", recipe="byol", local_crops=2, local_image_size=16, augment=aug)
    )
    assert [v.scale for v in views[:2]] == [(0.5, 1.0)] * 2
    assert views[2].scale == RECIPES["byol"].local_scale
    assert all(v.hue == 0.0 and v.blur_p == 0.0 and v.mean == (0.5,) * 3 for v in views)
    assert [v.solarize_p for v in views] == [0.0, 0.3, 0.2, 0.2]  # locals keep the recipe's value


def test_from_yaml_mapping_through_the_config_loader():
    cfg = build(
        DataConfig,
        {
            "train_shards": "s3://b/shards",
            "recipe": "mocov2",
            "augment": {"blur_p": [0.0], "crop_scale": [0.3, 1]},
        },
        "data",
    )
    assert cfg.augment.blur_p == (0.0,) and cfg.augment.crop_scale == (0.3, 1.0)
    assert resolve_views(cfg)[0].scale == (0.3, 1.0)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"recipe": "simclrr"}, "data.recipe"),
        ({"augment": {"blur_p": [0.1, 0.2, 0.3]}}, "data.augment.blur_p"),
        ({"augment": {"flip_p": 1.5}}, "data.augment.flip_p"),
        ({"augment": {"crop_scale": [0.9, 0.2]}}, "data.augment.crop_scale"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"backend": "gpu"}, "data.backend"),
    ],
)
def test_bad_values_name_their_key(raw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build(DataConfig, {"train_shards": "x", **raw}, "data")


def test_dino_and_swav_multicrop_recipes_follow_their_papers():
    dino = resolve_views(DataConfig(train_shards="x", recipe="dino", image_size=224, local_image_size=96))
    assert [v.size for v in dino] == [224] * 2 + [96] * 8
    assert (dino[0].scale, dino[2].scale) == ((0.4, 1.0), (0.05, 0.4))
    assert [v.blur_p for v in dino[:3]] == [1.0, 0.1, 0.5] and [v.solarize_p for v in dino[:3]] == [0, 0.2, 0]
    swav = resolve_views(DataConfig(train_shards="x", recipe="swav", image_size=224, local_image_size=96))
    assert [v.size for v in swav] == [224] * 2 + [96] * 6
    assert (swav[0].scale, swav[2].scale) == ((0.14, 1.0), (0.05, 0.14))
    assert {v.blur_p for v in swav} == {0.5} and {v.solarize_p for v in swav} == {0.0}
