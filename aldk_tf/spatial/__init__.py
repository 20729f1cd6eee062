"""Pure tensor functions for dense spatial transforms.

Everything that moves voxels lives here, once: the voxel grid, the one trilinear sampler
with edge clamping (:func:`warp` on a flow, :func:`sample` at points, both with
``mode="linear"|"nearest"``), label warping (:func:`warp_labels`, :func:`sample_labels`:
one set of rules), the affine-matrix-to-flow map, flow composition and the Jacobian
determinant. Models, losses, metrics, augmentation, exporters and the register/warp tools
all call these.

Conventions: tensors are channels-last ``[B, D, H, W, C]``; a flow is
``[B, D, H, W, 3]`` in voxels and channel ``i`` is the displacement along array axis
``i``; warping samples the moving image at ``x + flow(x)``.
"""

from .labels import LABEL_RULES, MASK_THRESHOLD, sample_labels, warp_labels
from .resolution import (downsample, downsample_flow, upsample, upsample_flow,
                         upsample_flow_and_warp)
from .sampling import MODES, sample, warp
from .transforms import (affine_flow, compose, compose_affine, invert_flow,
                         jacobian_determinant, spatial_gradient, voxel_grid)

__all__ = ["LABEL_RULES", "MASK_THRESHOLD", "MODES", "affine_flow", "compose",
           "compose_affine", "downsample", "downsample_flow", "invert_flow",
           "jacobian_determinant", "sample", "sample_labels", "spatial_gradient", "upsample",
           "upsample_flow", "upsample_flow_and_warp", "voxel_grid", "warp", "warp_labels"]
