"""ANTs SyN on one pair of numpy volumes, run by an antspyx environment's Python.

``<ants python> bench/ants_syn.py FOLDER``: reads ``FOLDER/fixed.npy`` and
``FOLDER/moving.npy`` (``[D, H, W]`` float32), runs ``ants.registration`` (affine +
deformable SyN, antspyx's defaults), writes ``FOLDER/flow.npy`` (``[D, H, W, 3]`` float32,
this project's convention: voxels, channel i along array axis i, the moving image sampled
at ``x + flow(x)``) and ``FOLDER/seconds.json`` (the registration's wall time, without
interpreter start-up or the field's composition). Images are built with unit spacing, zero
origin and identity direction, so ANTs' physical axis i is array axis i and its composed
forward field (fixed points to moving points, physical units) is that flow. Only numpy and
antspyx are imported: the project's environment need not have antspyx.
"""

import json
import os
import sys
import time

import numpy as np


def main(folder: str) -> int:
    import ants
    fixed = ants.from_numpy(np.load(os.path.join(folder, "fixed.npy")).astype(np.float32))
    moving = ants.from_numpy(np.load(os.path.join(folder, "moving.npy")).astype(np.float32))
    start = time.perf_counter()
    result = ants.registration(fixed, moving, type_of_transform="SyN")
    seconds = time.perf_counter() - start
    composed = ants.apply_transforms(fixed, moving, result["fwdtransforms"],
                                     compose=os.path.join(folder, "composed_"))
    field = ants.image_read(composed).numpy()          # [D, H, W, 3]
    np.save(os.path.join(folder, "flow.npy"), field.astype(np.float32))
    with open(os.path.join(folder, "seconds.json"), "w") as handle:
        json.dump({"seconds": seconds}, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
