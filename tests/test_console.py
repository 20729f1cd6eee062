"""aldk_tf/console.py and the command lines' console: --help without TensorFlow, no
TensorFlow log lines before a one-line error, progress as plain lines in logs."""

import io
import subprocess
import sys

import pytest

from aldk_tf.console import Progress

#: Console scripts whose --help answers without importing TensorFlow.
QUIET_HELP = ("register", "warp", "build_demo", "train", "nifti_to_h5", "demo", "report",
              "evaluate", "export", "teacher_flows")

CHECK = """
import runpy, sys
sys.argv = ["tool", "--help"]
try:
    runpy.run_module("aldk_tf.cli.{module}", run_name="__main__")
except SystemExit as exit:
    code = exit.code
print("TENSORFLOW" if "tensorflow" in sys.modules else "NO-TENSORFLOW", code)
"""


@pytest.mark.parametrize("module", QUIET_HELP)
def test_help_imports_no_tensorflow(module):
    done = subprocess.run([sys.executable, "-c", CHECK.format(module=module)],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "NO-TENSORFLOW 0", done.stdout
    assert "usage:" in done.stdout and done.stderr == ""


def test_a_bad_input_error_is_one_line_without_tensorflow_lines(tmp_path):
    """TensorFlow starts (the model would be loaded), quietly: stderr is the error only."""
    done = subprocess.run(
        [sys.executable, "-m", "aldk_tf.cli.register", "--model", str(tmp_path),
         "--fixed", str(tmp_path / "absent.nii.gz"), "--moving", str(tmp_path / "b.nii"),
         "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "absent.nii.gz" in lines[0]


@pytest.mark.parametrize("module, flags", [
    ("evaluate", ["-c", "{missing}"]),
    ("export", ["-c", "{missing}", "--out", "{tmp}/export"]),
    ("teacher_flows", ["-c", "{missing}"]),
])
def test_tools_that_load_a_run_fail_in_one_line_without_tensorflow_lines(module, flags,
                                                                         tmp_path):
    """TensorFlow is imported (quietly) before the run is read: stderr is the error only."""
    missing = tmp_path / "no_such_run"
    done = subprocess.run(
        [sys.executable, "-m", f"aldk_tf.cli.{module}",
         *[flag.format(missing=missing, tmp=tmp_path) for flag in flags]],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "no_such_run" in lines[0]
    assert sorted(path.name for path in tmp_path.iterdir()) == []     # nothing written


def test_progress_is_plain_lines_when_not_a_terminal():
    stream = io.StringIO()
    progress = Progress(2, "pairs", stream)
    progress.step("a: ok")
    progress.step("b: error: x")
    lines = stream.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["[1/2] a: ok", "[2/2] b: error: x"]
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()


def test_progress_redraws_one_line_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = Progress(2, "pairs", stream)
    progress.step("a")
    progress.step("b")
    assert stream.getvalue().count("\r") == 2 and stream.getvalue().endswith("\n")


def test_refine_flags_default_matches_the_refinement():
    from aldk_tf import refine_options
    from aldk_tf.training import refine
    assert refine_options.DEFAULT_LEARNING_RATE == refine.DEFAULT_LEARNING_RATE


@pytest.mark.parametrize("module", ("report", "register", "warp"))
def test_help_shows_no_raw_markup(module):
    done = subprocess.run([sys.executable, "-m", f"aldk_tf.cli.{module}", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "``" not in done.stdout and ":mod:" not in done.stdout, done.stdout
