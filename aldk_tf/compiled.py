"""One way to make an XLA-compiled ``tf.function`` of plain tensor code: :func:`xla`."""

from __future__ import annotations

import tensorflow as tf


def xla(function, reduce_retracing: bool = True):
    """``function`` as a ``tf.function`` compiled by XLA, traced without autograph.

    The compiled helpers (warps, samplers, smoothness, Adam steps, layer rewrites) branch
    and loop only on Python values (static axes and shapes), so autograph has nothing to
    convert in them; converting them anyway cost 0.24 s of the first trace in a process
    (the sampler of ``aldk-register``: 0.30 s traced with autograph, 0.06 s without,
    quiet 2-core machine). A tensor-dependent Python ``if`` in such a body fails at
    trace time instead of being converted.
    """
    return tf.function(function, jit_compile=True, autograph=False,
                       reduce_retracing=reduce_retracing)
