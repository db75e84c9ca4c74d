"""DALI reads our shards through our `.idx` files: a CPU-only pipeline (device_id=None)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
from nvidia.dali import fn, pipeline_def

from data_prep.manifest import read_manifest, split_indexes, split_shards


def test_dali_reads_every_sample_once_per_epoch(sample_shards: Path) -> None:
    url = str(sample_shards)
    manifest = read_manifest(url)
    batch_size = 250

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None)
    def reader_pipeline():
        image, label, meta = fn.readers.webdataset(
            paths=split_shards(url, "train"),
            index_paths=split_indexes(url, "train"),
            ext=["jpg;png", "cls", "json"],
            missing_component_behavior="error",
            name="reader",
        )
        return fn.decoders.image(image, device="cpu"), label, meta

    pipe = reader_pipeline()
    pipe.build()
    assert pipe.epoch_size("reader") == manifest["total_samples"] == 2000
    for _ in range(2):
        paths = Counter()
        for _ in range(manifest["total_samples"] // batch_size):
            images, labels, metas = pipe.run()
            for i in range(len(metas)):
                meta = json.loads(np.asarray(metas.at(i)).tobytes())
                label = int(np.asarray(labels.at(i)).tobytes())
                assert manifest["classes"][label] == meta["path"].split("/")[0]
                assert np.asarray(images.at(i)).shape == (meta["height"], meta["width"], 3)
                paths[meta["path"]] += 1
        assert len(paths) == 2000 and set(paths.values()) == {1}
