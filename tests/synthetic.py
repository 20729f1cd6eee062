"""Small synthetic datasets in the RCN layout, for tests that need a few scans fast."""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndimage

from aldk_tf.data import write_dataset, write_dataset_config


def blob_scan(rng, size: int):
    """An ellipsoid (label 2) with a core (label 1), randomly shifted and scaled."""
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).astype(float)
    centre = size / 2 + rng.uniform(-size / 10, size / 10, 3)
    radii = size * rng.uniform(0.22, 0.32, 3)
    distance = np.sqrt((((grid - centre) / radii) ** 2).sum(-1))
    segmentation = np.where(distance < 0.5, 1, np.where(distance < 1.0, 2, 0))
    volume = np.select([distance < 0.5, distance < 1.0], [220.0, 120.0], 20.0)
    volume = ndimage.gaussian_filter(volume, 1.0) + rng.normal(0, 4, volume.shape)
    return {"volume": np.clip(volume, 0, 255).astype(np.uint8),
            "segmentation": segmentation.astype(np.uint8)}


def write_blob_dataset(folder, size=32, train=6, validation=2, test=2, seed=0) -> str:
    """``folder/blobs.h5`` + ``folder/blobs.json``; returns the JSON path."""
    rng = np.random.default_rng(seed)
    names = {"train": train, "validation": validation, "test": test}
    scans, subsets = {}, {}
    for subset, count in names.items():
        subsets[subset] = []
        for i in range(count):
            scan_id = f"{subset}{i:02d}"
            scans[scan_id] = blob_scan(rng, size)
            subsets[subset].append(f"blobs/{scan_id}")
    write_dataset(f"{folder}/blobs.h5", scans)
    json_path = f"{folder}/blobs.json"
    write_dataset_config(json_path, files={"blobs": {"type": "HDF5", "path": "blobs.h5"}},
                         subsets=subsets,
                         schemes={"1": {"train": 1.0}, "2": {"validation": 1.0},
                                  "test": {"test": 1.0}},
                         image_size=(size,) * 3, image_type="synthetic",
                         segmentation_class_value={"core": 1, "shell": 2})
    return json_path


def perturbed_student_run(run_dir, dataset: str, size: int, std: float = 0.05,
                          seed: int = 0) -> str:
    """``weights/<run>`` of an untrained ``size``³ student whose weights are perturbed by
    N(0, ``std``), so that its flows reach a few voxels and output comparisons can fail."""
    from aldk_tf.config import ModelConfig, RunConfig
    from aldk_tf.training import runs
    config = RunConfig(dataset=dataset, model=ModelConfig(image_size=(size,) * 3))
    model = config.model.build()
    noise = np.random.default_rng(seed)
    model.set_weights([w + noise.normal(0, std, w.shape).astype(w.dtype)
                       for w in model.get_weights()])
    config.save(str(run_dir))
    model.save_weights(runs.weights_path(str(run_dir)))
    return str(run_dir)
