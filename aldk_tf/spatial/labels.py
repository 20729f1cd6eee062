"""Label maps moved without mixing label values: one function, three rules."""

from __future__ import annotations

import tensorflow as tf

from .sampling import sample, warp


#: Label rules of :func:`warp_labels`. ``"threshold"`` is the evaluation's: each label's
#: mask x 255 is warped trilinearly and kept where above :data:`MASK_THRESHOLD` (the warped
#: masks of all labels sum to 255, so at most one passes at any voxel; 0 where none does).
#: ``"largest"`` is the augmentation's: each label's mask and the background's are warped
#: and every voxel takes the label of the largest. ``"nearest"``: the nearest voxel's label.
LABEL_RULES = ("threshold", "largest", "nearest")

#: The 0..255 threshold of a binary mask (the liver's 0/255 segmentations) and of warped
#: label masks.
MASK_THRESHOLD = 128.0


def warp_labels(labels: tf.Tensor, flow: tf.Tensor, rule: str = "threshold",
                label_values=None) -> tf.Tensor:
    """Warp a label map ``[B, D, H, W, 1]`` by ``flow`` without mixing label values.

    The one label warp: the evaluation (:func:`aldk_tf.metrics.warp_segmentation`), the
    SavedModel's ``warp_segmentation`` signature, augmentation and the register/warp
    tools all use it. ``rule`` is one of :data:`LABEL_RULES`; ``label_values`` lists the
    labels to keep (others become 0), by default every value present. Dtype kept.
    """
    labels = tf.convert_to_tensor(labels)
    return _labels_by_rule(labels, lambda volume, mode: warp(volume, flow, mode),
                           tf.shape(labels), rule, label_values)


def sample_labels(labels: tf.Tensor, points: tf.Tensor, rule: str = "threshold",
                  label_values=None) -> tf.Tensor:
    """:func:`warp_labels` at voxel ``points`` ``[B, ..., 3]`` (see :func:`sample`)."""
    labels = tf.convert_to_tensor(labels)
    points = tf.convert_to_tensor(points, tf.float32)
    return _labels_by_rule(labels, lambda volume, mode: sample(volume, points, mode),
                           tf.concat([tf.shape(points)[:-1], [1]], 0), rule, label_values)


def _labels_by_rule(labels, move, output_shape, rule, label_values):
    """``labels`` moved by ``move(volume, mode)`` under ``rule`` (see :func:`warp_labels`)."""
    if rule not in LABEL_RULES:
        raise ValueError(f"rule: expected one of {LABEL_RULES}, got {rule!r}")
    if rule == "nearest":
        return move(labels, "nearest")
    if label_values is None:
        values, _ = tf.unique(tf.reshape(labels, [-1]))
    else:
        values = tf.cast(tf.constant(list(label_values), tf.float64), labels.dtype)
    values = tf.boolean_mask(values, tf.not_equal(values, 0))    # [L], background left out
    if rule == "largest":
        masks = tf.cast(tf.equal(labels, values), tf.float32)    # [B, D, H, W, L]
        masks = tf.concat([1.0 - tf.reduce_sum(masks, -1, keepdims=True), masks], axis=-1)
        largest = tf.argmax(move(masks, "linear"), axis=-1)
        return tf.gather(tf.concat([tf.zeros([1], labels.dtype), values], 0), largest)[..., None]

    def one_label(index, result):
        mask = tf.cast(tf.equal(labels, values[index]), tf.float32) * 255.0
        return index + 1, tf.where(move(mask, "linear") > MASK_THRESHOLD, values[index],
                                   result)

    _, result = tf.while_loop(lambda index, _: index < tf.size(values), one_label,
                              [tf.constant(0), tf.zeros(output_shape, labels.dtype)])
    return result
