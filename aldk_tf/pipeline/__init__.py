"""Runs that chain every stage of the package: data → training → evaluation → export.

- :mod:`.demo` the whole pipeline, offline, on the embedded demo dataset (``aldk-demo``,
  :mod:`aldk_tf.cli.demo`)
"""
