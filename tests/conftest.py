import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def pytest_configure(config):
    # Keras converts eager tensors with np.array(x, copy=False) internally (numpy 2 noise).
    config.addinivalue_line(
        "filterwarnings", "ignore:__array__ implementation doesn't accept a copy keyword")


# --- evaluation / export / registration fixtures (tests/test_evaluation.py, test_serving.py,
# test_register.py): a small demo dataset and a student run directory at 32^3, built once.
DEMO_SIZE = 32


@pytest.fixture(scope="session")
def demo_dataset_32(tmp_path_factory):
    """``demo.json`` of a 6-subject demo dataset at 32^3 (2 train, 2 val, 2 test)."""
    from aldk_tf.data.demo_set import build_demo
    folder = tmp_path_factory.mktemp("demo32")
    return str(build_demo(folder, size=DEMO_SIZE, seed=0, subjects=6, validation=2,
                          test=2, log=None))


@pytest.fixture(scope="session")
def student_run_32(tmp_path_factory, demo_dataset_32):
    """``weights/<run>`` of an untrained 32^3 student whose weights are perturbed enough
    (N(0, 0.05)) that its flows reach a few voxels, so output comparisons can fail."""
    from synthetic import perturbed_student_run
    return perturbed_student_run(tmp_path_factory.mktemp("weights") / "student32",
                                 demo_dataset_32, DEMO_SIZE, std=0.05, seed=0)


@pytest.fixture(scope="session")
def savedmodel_32_unrecorded(student_run_32, tmp_path_factory):
    """``export/aldk/1``: the 32^3 student as a SavedModel without export_info.json (as a
    model exported before the preprocessing was recorded)."""
    from aldk_tf.training import runs
    from aldk_tf.deploy import serving
    _, model = runs.load_model(student_run_32)
    path = tmp_path_factory.mktemp("export") / "aldk" / "1"
    serving.save_savedmodel(model, str(path))
    return str(path)


@pytest.fixture(scope="session")
def savedmodel_32(savedmodel_32_unrecorded, demo_dataset_32, tmp_path_factory):
    """``export/aldk/1``: the same SavedModel with an export_info.json that records its
    dataset's preprocessing (the demo builder's), as export.py writes it."""
    import json
    import shutil
    path = tmp_path_factory.mktemp("export_recorded") / "aldk" / "1"
    shutil.copytree(savedmodel_32_unrecorded, path)
    with open(demo_dataset_32) as handle:
        preprocessing = json.load(handle)["preprocessing"]
    (path / "export_info.json").write_text(json.dumps({"preprocessing": preprocessing}))
    return str(path)
