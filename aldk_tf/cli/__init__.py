"""Command-line front ends, one module per console script (argparse and glue only).

- ``aldk-train``       :mod:`aldk_tf.cli.train`        (``python train.py`` in a checkout)
- ``aldk-evaluate``    :mod:`aldk_tf.cli.evaluate`     (``python evaluate.py``)
- ``aldk-export``      :mod:`aldk_tf.cli.export`       (``python export.py``)
- ``aldk-prep``        :mod:`aldk_tf.cli.nifti_to_h5`  (``python data_prep/nifti_to_h5.py``)
- ``aldk-build-demo``  :mod:`aldk_tf.cli.build_demo`   (``python data_prep/build_demo.py``)
- ``aldk-register``    :mod:`aldk_tf.cli.register`
- ``aldk-teacher-flows`` :mod:`aldk_tf.cli.teacher_flows`
- ``aldk-warp``        :mod:`aldk_tf.cli.warp`
- ``aldk-demo``        :mod:`aldk_tf.cli.demo`
- ``aldk-report``      :mod:`aldk_tf.cli.report`

(see ``[project.scripts]`` in pyproject.toml; ``python -m aldk_tf.cli.<module>`` runs
each without installing). Only this package holds mains, and no module outside it imports
from it (``tests/test_import_graph.py``). Each ``main(argv=None)`` returns the exit
status (0, or 2 after a one-line ``error: ...``).
Importing this package imports no TensorFlow: ``aldk-train`` must choose its devices
before TensorFlow starts.
"""
