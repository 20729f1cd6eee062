"""Deployment: the inference graph, export, and registration of new scans.

- :mod:`.inference`       the fast inference graph (student-only, mixed precision)
- :mod:`.serving`         SavedModel signatures, TFLite conversion, parity checks
- :mod:`.export`          versioned export directories (atomic, TF Serving warm-up)
- :mod:`.export_layout`   the export directory's names and options, without TensorFlow
- :mod:`.preparation`     how register prepares new scans like the model's training data
- :mod:`.register`        register a NIfTI pair with an exported model
- :mod:`.register_batch`  register every pair of a CSV with the model loaded once
- :mod:`.warp`            apply a saved flow to any NIfTI image or label map

Importing this package imports none of them.
"""
