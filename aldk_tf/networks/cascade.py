"""Recursive cascades (RCN): an affine stage, then n deformable cascades of a base network.

Every cascade sees ``(fixed, moving warped by the current aggregate flow)``; its own flow
is composed into the aggregate (``agg_k(x) = agg_{k-1}(x + flow_k(x)) + flow_k(x)``, in
the exact ``A flow + affine`` form right after the affine stage), and the original moving
image is warped once by the aggregate, so interpolation never accumulates.
"""

from __future__ import annotations

import keras

from aldk_tf.layers import ComposeAffine, ComposeFlows, Downsample, UpsampleFlow, Warp
from aldk_tf.networks.affine import (AFFINE_VARIANTS, LEGACY_MATRIX_GAIN, MATRIX_GAIN,
                                     AffineStem)
from aldk_tf.networks.bases import BASES, student_variant_name
from aldk_tf.networks.blocks import check_image_size


def _base_network(base, image_size, flow_multiplier, name, channels, student_variant):
    spec = BASES[base]
    settings = {"channels": channels, "variant": student_variant}
    return spec.network_class()(image_size, flow_multiplier=flow_multiplier, name=name,
                                **{key: settings[key] for key in spec.settings})


@keras.saving.register_keras_serializable(package="aldk_tf")
class RecursiveCascade(keras.Model):
    """``{"fixed", "moving"}`` (``[B, D, H, W, 1]`` each) -> a dict of outputs.

    Outputs: ``flow`` (final aggregate, ``[B, D, H, W, 3]``), ``warped`` (moving warped
    by it), ``matrix`` / ``translation`` / ``affine_flow`` (affine stage; zeros-free
    only when ``affine`` is set), and per deformable step k = 1..n·rep
    ``cascade_flow_k`` (the step's own flow) and ``warped_k``.

    Args:
      image_size: (D, H, W), each divisible by 16.
      base: a key of :data:`aldk_tf.networks.bases.BASES` ("vtn", "voxelmorph",
        "student").
      n_cascades: number of distinct deformable cascades; each has flow multiplier 1/n.
      rep: shared-weight repetition: every cascade is applied ``rep`` times in a row
        (RCN's test-time trick); the weights are those of the ``rep=1`` model.
      affine: "vtn", "student" or None (no affine stage).
      channels: VTN/student base width.
      student_variant: "paper" (the paper's transposed-conv decoder) or "release" (the
        released code's); "seed", its earlier name, is read as "paper".
      matrix_gain: the affine stage's ``W`` = head output times this (see
        :data:`aldk_tf.networks.affine.MATRIX_GAIN`; 1 in models saved before it existed).
      resolution_factor: cross-resolution model (CRD): the inputs are
        ``image_size`` but every stage runs on the pair block-averaged by this factor;
        the aggregate flow (output ``low_flow``) is upsampled to full resolution (values
        times the factor) and warps the full-resolution moving image. ``cascade_flow_k``,
        ``warped_k`` and the affine outputs stay at the low resolution.
    """

    def __init__(self, image_size=(128, 128, 128), base="vtn", n_cascades=1, rep=1,
                 affine="vtn", channels=16, student_variant="paper", resolution_factor=1,
                 matrix_gain=MATRIX_GAIN, name="cascade", **kwargs):
        student_variant = student_variant_name(student_variant)
        if base not in BASES:
            raise ValueError(f"RecursiveCascade: base must be one of {tuple(BASES)}, got "
                             f"{base!r}")
        if affine is not None and affine not in AFFINE_VARIANTS:
            raise ValueError(f"RecursiveCascade: affine must be one of "
                             f"{sorted(AFFINE_VARIANTS)} or None, got {affine!r}")
        if int(n_cascades) < 1 or int(rep) < 1:
            raise ValueError(f"RecursiveCascade: n_cascades and rep must be >= 1, got "
                             f"n_cascades={n_cascades}, rep={rep}")
        factor = int(resolution_factor)
        full_size = tuple(int(n) for n in image_size)
        if factor < 1 or any(n % factor for n in full_size):
            raise ValueError(f"RecursiveCascade: image_size {full_size} must be divisible "
                             f"by resolution_factor {resolution_factor}")
        image_size = check_image_size("RecursiveCascade (per-stage grid)",
                                      [n // factor for n in full_size], 16)
        fixed_full = keras.Input(shape=(*full_size, 1), name="fixed")
        moving_full = keras.Input(shape=(*full_size, 1), name="moving")
        fixed, moving = fixed_full, moving_full
        if factor > 1:
            fixed = Downsample(factor, name="downsample_fixed")(fixed_full)
            moving = Downsample(factor, name="downsample_moving")(moving_full)
        outputs = {}
        warp = Warp(name="warp")
        concat = keras.layers.Concatenate(name="pair")

        aggregate = matrix = None
        warped = moving
        if affine is not None:
            stem = AffineStem(image_size, variant=affine, name="affine_stem",
                              matrix_gain=matrix_gain)
            affine_out = stem(concat([fixed, moving]))
            matrix, aggregate = affine_out["matrix"], affine_out["flow"]
            outputs.update(matrix=matrix, translation=affine_out["translation"],
                           affine_flow=aggregate)
            warped = warp([moving, aggregate])

        networks = [_base_network(base, image_size, 1.0 / n_cascades, f"cascade_{k + 1}",
                                  channels, student_variant)
                    for k in range(n_cascades)]
        step = 0
        for network in networks:
            for _ in range(rep):
                step += 1
                flow = network(concat([fixed, warped]))
                if aggregate is None:
                    aggregate = flow
                elif step == 1:
                    aggregate = ComposeAffine(name="compose_affine")(
                        [matrix, aggregate, flow])
                else:
                    aggregate = ComposeFlows(name=f"compose_{step}")([aggregate, flow])
                warped = warp([moving, aggregate])
                outputs[f"cascade_flow_{step}"] = flow
                outputs[f"warped_{step}"] = warped
        if factor > 1:
            outputs["low_flow"] = aggregate
            aggregate = UpsampleFlow(factor, name="upsample_flow")(aggregate)
            warped = warp([moving_full, aggregate])
        outputs.update(flow=aggregate, warped=warped)
        super().__init__(inputs={"fixed": fixed_full, "moving": moving_full},
                         outputs=outputs, name=name, **kwargs)
        self.image_size, self.base, self.affine = full_size, base, affine
        self.resolution_factor = factor
        self.n_cascades, self.rep, self.channels = int(n_cascades), int(rep), channels
        self.student_variant = student_variant
        self.matrix_gain = float(matrix_gain)
        self.steps = step

    def get_config(self):
        return {"image_size": list(self.image_size), "base": self.base,
                "n_cascades": self.n_cascades, "rep": self.rep, "affine": self.affine,
                "channels": self.channels, "student_variant": self.student_variant,
                "resolution_factor": self.resolution_factor,
                "matrix_gain": self.matrix_gain, "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**{"matrix_gain": LEGACY_MATRIX_GAIN, **config})

    def with_rep(self, rep: int) -> "RecursiveCascade":
        """The same weights applied with ``rep`` shared-weight repetitions."""
        model = RecursiveCascade(**{**self.get_config(), "rep": rep})
        model.set_weights(self.get_weights())
        return model

    def registration_model(self) -> keras.Model:
        """Inference graph: ``{"fixed", "moving"}`` -> ``{"flow", "warped"}`` only."""
        outputs = {key: self.output[key] for key in ("flow", "warped")}
        return keras.Model(inputs=self.input, outputs=outputs, name=f"{self.name}_register")

    def deformable_flow_keys(self) -> list[str]:
        return [f"cascade_flow_{k}" for k in range(1, self.steps + 1)]

    def parameter_report(self) -> dict[str, int]:
        """Trainable + non-trainable parameters per stage, and the total."""
        report = {layer.name: int(layer.count_params()) for layer in self.layers
                  if isinstance(layer, keras.Model)}
        report["total"] = int(self.count_params())
        return report


def build_teacher(image_size=(128, 128, 128), n_cascades=3, base="vtn", rep=1,
                  name="teacher") -> RecursiveCascade:
    """The RCN teacher: VTN affine stem + ``n_cascades`` VTN (or VoxelMorph) cascades."""
    return RecursiveCascade(image_size, base=base, n_cascades=n_cascades, rep=rep,
                            affine="vtn", name=name)


def build_student(image_size=(128, 128, 128), n_cascades=1, variant="paper", rep=1,
                  resolution_factor=1, name="student") -> RecursiveCascade:
    """The light-weight student: cheap affine stage + ``n_cascades`` student cascades;
    ``resolution_factor > 1`` makes it the cross-resolution student."""
    return RecursiveCascade(image_size, base="student", n_cascades=n_cascades, rep=rep,
                            affine="student", student_variant=variant,
                            resolution_factor=resolution_factor, name=name)
