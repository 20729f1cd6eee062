"""The export directory's names and options, and its folders, without TensorFlow.

What the command lines check before any model work (so that ``--help`` and a bad flag
answer without loading TensorFlow): the file and signature names of an export version
directory (:mod:`aldk_tf.deploy.export` writes it, :mod:`aldk_tf.deploy.serving` the
signatures and TFLite files in it), the TFLite variants and SavedModel dtypes that can be
asked for, :class:`ExportError`, and the output-folder helpers the tools share.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

SERVING_SIGNATURE = "serving_default"
WARP_SIGNATURE = "warp_segmentation"
TFLITE_VARIANTS = ("fp32", "fp16", "int8")
TFLITE_DIR = "tflite"
INFO_NAME = "export_info.json"
#: The SavedModel's convolution dtypes (:mod:`aldk_tf.deploy.inference`).
DTYPES = ("float32", "bfloat16")


class ExportError(ValueError):
    """An export that cannot be done (one-line message naming the path or the value)."""


def next_version(base: str) -> int:
    """One more than the largest numeric version directory under ``base`` (or 1)."""
    if not os.path.isdir(base):
        return 1
    versions = [int(name) for name in os.listdir(base) if name.isdigit()]
    return max(versions, default=0) + 1


def make_writable_folder(folder: str) -> None:
    """Create ``folder`` (and its parents) and check that a file can be written in it;
    OSError if not."""
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
        pass


def prepare_base(base: str) -> None:
    """Create ``base`` and check that a file can be written in it (ExportError if not)."""
    try:
        make_writable_folder(base)
    except OSError as error:
        raise ExportError(f"{base}: output directory not writable "
                          f"({error.strerror or error})") from None


def remove_if_new_and_empty(base: str, existed: bool) -> None:
    """Remove ``base`` when it did not exist before the command (``existed``) and holds
    nothing: a command that failed leaves no empty output folder behind."""
    if not existed:
        with contextlib.suppress(OSError):
            os.rmdir(base)


def make_readable(folder: str) -> None:
    """Give a staging directory (``mkdtemp``: 0700) the usual umask permissions, so a
    model server running as another user can read the version directory."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
