"""Training: trainers, the run directory and everything a run reads or writes.

- :mod:`.trainer`        the unsupervised trainer (similarity + regularisers) and its base
- :mod:`.aldk`           adversarial distillation (student, critic, frozen teacher)
- :mod:`.crd`            cross-resolution distillation
- :mod:`.refine`         instance optimisation of a flow (refined targets, test time)
- :mod:`.schedules`      the release's learning-rate schedules
- :mod:`.run`            the ``train()`` driver: data, trainer, callbacks, validation
- :mod:`.runs`           the run directory (config.json, weights, loading a model)
- :mod:`.checkpoints`    atomic weight files and resumable checkpoints
- :mod:`.teacher_flows`  extraction of the teacher's flows; :mod:`.flow_store` their file
- :mod:`.distribute`     device strategies (mirrored, multi-worker)

Importing this package imports none of them (the command-line tools choose devices
before TensorFlow starts).
"""
