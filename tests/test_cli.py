"""The ``batchinfer`` command line, run as a subprocess: help, import hygiene and one-line errors.

None of these paths may load a model: every subprocess runs with stub ``tensorflow`` and ``keras``
packages first on its path that fail loudly when imported, so an accidental import shows up as a
failed test instead of a slow one.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import _env, assert_one_line_error

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = str(ROOT / "tests" / "data" / "photos")
DEAD_BROKER = "redis://127.0.0.1:1/0"  # nothing listens on port 1


@pytest.fixture(scope="module")
def dead_port():
    with socket.socket() as s:
        s.settimeout(1)
        if s.connect_ex(("127.0.0.1", 1)) == 0:
            pytest.skip("something listens on 127.0.0.1:1")


# --- help and imports --------------------------------------------------------------------------------


def test_help_lists_subcommands(cli):
    result = cli("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: batchinfer")
    for command in ("run", "submit", "status", "collect"):
        assert command in result.stdout
    assert ("{run,submit,serve,models,layers,train-head,index,search,status,jobs,retry,cancel,delete,collect,report,"
            "exporter}"
            in result.stdout)


@pytest.mark.parametrize("command", ["run", "submit", "status", "collect"])
def test_subcommand_help(cli, command):
    result = cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: batchinfer {command}")


def test_version(cli):
    from workers import __version__

    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"batchinfer {__version__}"


def test_no_subcommand_is_a_one_line_error(cli):
    result = cli()
    assert result.returncode == 2
    assert_one_line_error(result, "required")


def test_stub_guard_blocks_tensorflow(no_tf_path):
    """The stubs really shadow the installed packages, so the error tests below prove no model is loaded."""
    for name in ("tensorflow", "keras"):
        result = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, env=_env(no_tf_path),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode != 0
        assert f"{name} must not be imported" in result.stderr


@pytest.mark.parametrize("module", ["producer.cli", "workers"])
def test_import_leaves_tensorflow_and_keras_unloaded(module):
    code = f"import sys, {module}; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


# --- one-line errors ---------------------------------------------------------------------------------


def test_unknown_model(cli, tmp_path):
    result = cli("run", PHOTOS, "-o", str(tmp_path / "out.csv"), "--model", "resnet5")
    assert result.returncode == 2
    assert_one_line_error(result, "resnet5", "did you mean ResNet50")
    assert not (tmp_path / "out.csv").exists()


def test_missing_folder(cli, tmp_path):
    missing = str(tmp_path / "no-such-folder")
    result = cli("run", missing, "-o", str(tmp_path / "out.csv"))
    assert_one_line_error(result, missing, "no such file or folder")


def test_missing_folder_on_submit_fails_before_the_broker(cli, tmp_path, dead_port):
    missing = str(tmp_path / "no-such-folder")
    result = cli("submit", missing, "-o", str(tmp_path / "out"), "--broker", DEAD_BROKER, "-q")
    line = assert_one_line_error(result, missing)
    assert "Redis" not in line


def test_bad_layer_lists_valid_layers(cli, tmp_path):
    result = cli("run", PHOTOS, "-o", str(tmp_path / "out.csv"), "--model", "VGG16", "--task", "features",
                 "--layer", "nope")
    assert result.returncode == 2
    assert_one_line_error(result, "'nope'", "Valid layers:", "block4_pool", "fc2")


def test_layer_without_features_task(cli, tmp_path):
    result = cli("run", PHOTOS, "-o", str(tmp_path / "out.csv"), "--model", "VGG16", "--layer", "block4_pool")
    assert_one_line_error(result, "--layer", "features")


def test_unknown_flag(cli, tmp_path):
    result = cli("run", PHOTOS, "-o", str(tmp_path / "out.csv"), "--frobnicate")
    assert result.returncode == 2
    assert_one_line_error(result, "--frobnicate")


def test_bad_choice(cli, tmp_path):
    result = cli("run", PHOTOS, "-o", str(tmp_path / "out.csv"), "--task", "segment")
    assert result.returncode == 2
    assert_one_line_error(result, "segment")


def test_top_k_zero(cli, tmp_path):
    result = cli("run", PHOTOS, "-o", str(tmp_path / "out.csv"), "--top-k", "0")
    assert result.returncode == 2
    assert_one_line_error(result, "--top-k")


def test_input_size_below_minimum(cli, tmp_path):
    result = cli("run", PHOTOS, "-o", str(tmp_path / "out.csv"), "--input-size", "8")
    assert result.returncode == 2
    assert_one_line_error(result, "--input-size 8", "minimum of 32")


def test_input_size_below_minimum_of_inception(cli, tmp_path):
    result = cli("run", PHOTOS, "-o", str(tmp_path / "out.csv"), "--model", "InceptionV3", "--input-size", "64")
    assert_one_line_error(result, "InceptionV3", "75")


def test_missing_weights_file(cli, tmp_path):
    weights = str(tmp_path / "missing.weights.h5")
    result = cli("run", PHOTOS, "-o", str(tmp_path / "out.csv"), "--weights", weights)
    assert result.returncode == 2
    assert_one_line_error(result, "--weights", "missing.weights.h5", "no such file")


def test_missing_weights_on_submit_is_only_a_warning(cli, tmp_path, dead_port):
    result = cli("submit", PHOTOS, "-o", str(tmp_path / "out"), "--weights", str(tmp_path / "w.h5"),
                 "--broker", DEAD_BROKER, "-q")
    assert result.returncode != 0  # from the broker, not from the weights
    assert "Traceback" not in result.stderr
    warning, error = result.stderr.strip().splitlines()
    assert warning.startswith("batchinfer: warning:") and "workers must have it" in warning
    assert error.startswith("batchinfer: error:") and DEAD_BROKER in error


def test_parquet_sink_needs_output(cli):
    result = cli("submit", PHOTOS, "--broker", DEAD_BROKER)
    assert result.returncode == 2
    assert_one_line_error(result, "--output")


def test_submit_shard_size_zero(cli, tmp_path):
    result = cli("submit", PHOTOS, "-o", str(tmp_path / "out"), "--shard-size", "0", "--broker", DEAD_BROKER)
    assert result.returncode == 2
    assert_one_line_error(result, "--shard-size")


def test_unsupported_source_file(cli, tmp_path):
    (tmp_path / "notes.docx").write_bytes(b"")
    result = cli("run", str(tmp_path / "notes.docx"), "-o", str(tmp_path / "out.csv"))
    assert_one_line_error(result, "notes.docx", "not a folder, image or manifest")


def test_csv_manifest_without_uri_column(cli, tmp_path, dead_port):
    (tmp_path / "m.csv").write_text("path\na.jpg\n", encoding="utf-8")
    result = cli("submit", str(tmp_path / "m.csv"), "-o", str(tmp_path / "out"), "--broker", DEAD_BROKER, "-q")
    assert_one_line_error(result, "m.csv", "'uri' column")


def test_folder_without_images(cli, tmp_path, dead_port):
    (tmp_path / "empty").mkdir()
    result = cli("submit", str(tmp_path / "empty"), "-o", str(tmp_path / "out"), "--broker", DEAD_BROKER, "-q")
    assert_one_line_error(result, "no images found")


# --- unreachable broker ------------------------------------------------------------------------------


def test_submit_with_unreachable_broker(cli, tmp_path, dead_port):
    result = cli("submit", PHOTOS, "-o", str(tmp_path / "out"), "--broker", DEAD_BROKER, "-q")
    assert result.returncode == 1
    assert_one_line_error(result, DEAD_BROKER)
    assert result.stdout == ""  # no job id printed
    assert result.elapsed < 10


def test_status_with_unreachable_broker(cli, dead_port):
    result = cli("status", "20250101-000000-abcdef", "--broker", DEAD_BROKER)
    assert result.returncode == 1
    assert_one_line_error(result, DEAD_BROKER)
    assert result.elapsed < 10


def test_collect_with_unreachable_broker(cli, tmp_path, dead_port):
    result = cli("collect", "20250101-000000-abcdef", "-o", str(tmp_path / "out.csv"), "--broker", DEAD_BROKER)
    assert_one_line_error(result, DEAD_BROKER)
    assert not (tmp_path / "out.csv").exists()
    assert result.elapsed < 10


def test_broker_from_the_environment(no_tf_path, dead_port):
    env = _env(no_tf_path)
    env["BATCHINFER_BROKER_URL"] = DEAD_BROKER
    result = subprocess.run([sys.executable, "-m", "producer.cli", "status", "some-job"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)
    assert_one_line_error(result, DEAD_BROKER)


def test_broker_password_is_not_echoed(cli, dead_port):
    result = cli("status", "some-job", "--broker", "redis://:s3cretpw@127.0.0.1:1/0")
    line = assert_one_line_error(result, "127.0.0.1:1")
    assert "s3cretpw" not in result.stderr
    assert "***" in line


# --- regressions: bugs found and fixed -------------------------------------------------------------


def test_run_shard_size_zero(cli, tmp_path):
    result = cli("run", PHOTOS, "-o", str(tmp_path / "out.csv"), "--shard-size", "0", "-q")
    assert_one_line_error(result, "--shard-size")


def test_undecodable_txt_manifest(cli, tmp_path, dead_port):
    (tmp_path / "m.txt").write_bytes(b"\xff\xfe\x00\x81 not utf-8\n")
    result = cli("submit", str(tmp_path / "m.txt"), "-o", str(tmp_path / "out"), "--broker", DEAD_BROKER, "-q")
    assert_one_line_error(result, "m.txt")


def test_corrupt_parquet_manifest(cli, tmp_path, dead_port):
    (tmp_path / "m.parquet").write_text("this is not parquet\n", encoding="utf-8")
    result = cli("submit", str(tmp_path / "m.parquet"), "-o", str(tmp_path / "out"), "--broker", DEAD_BROKER,
                 "-q")
    assert_one_line_error(result, "m.parquet")
