"""The first hour of a new user: every mistake is one line on stderr, before any work is done.

Each command runs as a user types it, with stub ``tensorflow``/``keras`` packages first on its path that
fail when imported (the ``cli`` fixture): an error that comes after a model was built fails the test.
The commands that must do real work (a run stopped by SIGTERM, metadata, TensorFlow's start-up noise)
run the installed ``batchinfer`` with tiny models.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests import probe_model
from tests.conftest import (
    BIN,
    PHOTOS,
    ROOT,
    assert_one_line_error,
    batchinfer,
    start_probe_worker,
    submit_probe,
    wait_until,
)
from workers.schema import read_job_metadata

DEAD_BROKER = "redis://127.0.0.1:1/0"


@pytest.fixture
def shared_tmp():
    """A folder every user can reach (pytest's own is root's alone), for commands run as ``nobody``."""
    folder = Path(tempfile.mkdtemp(prefix="batchinfer-mistakes-"))
    folder.chmod(0o755)
    yield folder
    for path in folder.rglob("*"):
        if path.is_dir():
            path.chmod(0o755)
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def read_only(shared_tmp):
    folder = shared_tmp / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


# --- where the output goes ------------------------------------------------------------------------------


def test_run_into_a_folder_it_cannot_write_fails_before_the_model(cli, read_only):
    result = cli("run", str(PHOTOS), "--output", str(read_only / "out.parquet"), as_nobody=True)
    assert result.returncode == 2
    assert_one_line_error(result, f"cannot write to {read_only}/out.parquet", "not writable")
    assert result.elapsed < 20  # type: ignore[attr-defined]


def test_run_into_an_existing_folder_names_a_file_to_use(cli, tmp_path):
    result = cli("run", str(PHOTOS), "--output", str(tmp_path))
    assert result.returncode == 2
    assert_one_line_error(result, f"{tmp_path} is a folder", "results.parquet")


def test_run_into_a_path_through_a_file(cli, tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"not a folder")
    result = cli("run", str(PHOTOS), "--output", str(tmp_path / "x.parquet" / "y.parquet"))
    assert_one_line_error(result, f"{tmp_path / 'x.parquet'} is a file, not a folder")


def test_collect_into_a_folder_it_cannot_write_is_checked_before_the_broker(cli, read_only):
    result = cli("collect", "some-job", "--output", str(read_only / "all.csv"), "--broker", DEAD_BROKER,
                 as_nobody=True)
    assert result.returncode == 2
    assert_one_line_error(result, "not writable")


def test_submit_into_a_file_is_refused(cli, tmp_path):
    (tmp_path / "out").write_text("a file")
    result = cli("submit", str(PHOTOS), "--output", str(tmp_path / "out"), "--broker", DEAD_BROKER)
    assert_one_line_error(result, "is a file, not a folder")


# --- configuration ----------------------------------------------------------------------------------------


def test_a_broker_that_is_not_redis(cli, tmp_path):
    result = cli("submit", str(PHOTOS), "--output", str(tmp_path / "out"), "--broker", "http://host")
    assert result.returncode == 2
    assert_one_line_error(result, "--broker must be a Redis URL", "'http://host'")


def test_a_broker_url_in_the_environment_that_is_not_redis_hides_its_password(cli):
    result = cli("jobs", env={"BATCHINFER_BROKER_URL": "amqp://user:secret@rabbit:5672//"})
    line = assert_one_line_error(result, "BATCHINFER_BROKER_URL must be a Redis URL")
    assert "secret" not in line


@pytest.mark.parametrize("command", [["models"], ["jobs"], ["run", str(PHOTOS), "-o", "x.csv"]])
def test_a_bad_environment_variable_is_one_line_for_every_command(cli, command):
    result = cli(*command, env={"BATCHINFER_IO_THREADS": "eight"})
    assert result.returncode == 2
    assert_one_line_error(result, "BATCHINFER_IO_THREADS must be an integer, got 'eight'")


@pytest.mark.parametrize("args, needle", [
    (["--sink", "redis", "--output", "DIR"], "--output is the parquet sink's folder"),
    (["--ttl", "60", "--output", "DIR"], "--ttl applies to --sink redis"),
    (["--task", "features", "--top-k", "3", "--output", "DIR"], "--top-k applies to --task classify"),
    (["--pooling", "max", "--output", "DIR"], "--pooling applies to --task features"),
    (["--top-k", "2000", "--output", "DIR"], "--top-k 2000 is more than the 1000 classes"),
])
def test_options_that_would_be_ignored_are_refused(cli, tmp_path, args, needle):
    args = [str(tmp_path / "out") if a == "DIR" else a for a in args]
    result = cli("submit", str(PHOTOS), *args, "--broker", DEAD_BROKER)
    assert result.returncode == 2
    assert_one_line_error(result, needle)


def test_collect_timeout_needs_wait(cli, tmp_path):
    assert_one_line_error(cli("collect", "job", "--output", str(tmp_path / "a.csv"), "--timeout", "5"),
                          "--timeout applies to --wait")


def test_layer_names_are_case_insensitive_and_typos_get_suggestions(cli, tmp_path):
    typo = cli("run", str(PHOTOS), "-o", str(tmp_path / "f.parquet"), "--model", "EfficientNetB0", "--task",
               "features", "--layer", "BLOCK4C_AD")
    assert_one_line_error(typo, "no layer 'BLOCK4C_AD'", "Did you mean: block4c_add")
    from producer.cli import build_parser
    from producer.config import model_spec_from_args

    args = build_parser().parse_args(["run", "x", "-o", "y.parquet", "--model", "EfficientNetB0", "--task",
                                      "features", "--layer", "BLOCK4C_ADD"])
    assert model_spec_from_args(args, files_must_exist=False).layers == ("block4c_add",)


@pytest.fixture
def torch_without_cuda(no_tf_path, tmp_path):
    """A path with stub ``torch`` (no CUDA) and ``torchvision`` packages before the TensorFlow stubs."""
    stubs = tmp_path / "torch-stubs"
    (stubs / "torchvision").mkdir(parents=True)
    (stubs / "torch").mkdir()
    (stubs / "torch" / "__init__.py").write_text("class cuda:\n    @staticmethod\n    def is_available():\n"
                                                 "        return False\n")
    (stubs / "torchvision" / "__init__.py").write_text("")
    (stubs / "torchvision" / "io.py").write_text("")
    return f"{stubs}{os.pathsep}{no_tf_path}"


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed here")
def test_decode_gpu_without_torch_is_one_line_before_any_work(cli, tmp_path):
    result = cli("run", str(PHOTOS), "-o", str(tmp_path / "out.csv"), "--decode", "gpu")
    assert result.returncode == 2
    assert_one_line_error(result, "--decode gpu needs PyTorch and torchvision", "pip install torch torchvision")
    assert not (tmp_path / "out.csv").exists()


def test_decode_gpu_without_cuda_is_one_line_before_any_work(cli, tmp_path, torch_without_cuda):
    result = cli("run", str(PHOTOS), "-o", str(tmp_path / "out.csv"), "--decode", "gpu",
                 env={"PYTHONPATH": torch_without_cuda})
    assert result.returncode == 2
    assert_one_line_error(result, "--decode gpu needs a CUDA GPU", "use --decode fast")


def test_submit_leaves_the_gpu_check_to_the_workers(cli, tmp_path, torch_without_cuda):
    """The submitting machine need not have the workers' GPU: ``submit --decode gpu`` goes on to the broker."""
    result = cli("submit", str(PHOTOS), "--output", str(tmp_path / "out"), "--decode", "gpu", "--broker",
                 DEAD_BROKER, env={"PYTHONPATH": torch_without_cuda})
    line = assert_one_line_error(result)
    assert "gpu" not in line.lower() and "127.0.0.1:1" in line


# --- weights files ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def notop_weights(tmp_path_factory) -> Path:
    """Real MobileNetV2 weights without the classifier, as Keras saves them (random values)."""
    import keras

    path = tmp_path_factory.mktemp("weights") / "mobilenetv2_notop.weights.h5"
    keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(96, 96, 3)).save_weights(path)
    return path


def test_weights_of_another_architecture_name_it(cli, notop_weights):
    result = cli("run", str(PHOTOS), "-o", "x.parquet", "--model", "ResNet50", "--task", "features", "--weights",
                 str(notop_weights))
    assert result.returncode == 2
    assert_one_line_error(result, "holds MobileNetV2 weights without the classifier, not ResNet50's",
                          "--model MobileNetV2")


def test_weights_without_the_classifier_cannot_classify(cli, notop_weights):
    result = cli("run", str(PHOTOS), "-o", "x.parquet", "--model", "mobilenetv2", "--weights", str(notop_weights))
    assert_one_line_error(result, "without the classifier", "--task features")


def test_a_file_that_is_not_weights(cli):
    result = cli("run", str(PHOTOS), "-o", "x.parquet", "--weights", str(PHOTOS / "cat.jpg"))
    assert_one_line_error(result, "is not a weights file")


def test_the_worker_names_the_architecture_too(notop_weights):
    """The same check where the weights are loaded (a worker may have another file at that path)."""
    from workers.contract import ModelSpec
    from workers.errors import ConfigError
    from workers.models.build import load_model
    from workers.models.registry import get_architecture

    arch = get_architecture("ResNet50")
    with pytest.raises(ConfigError) as info:
        load_model(ModelSpec(name="ResNet50", weights=str(notop_weights), task="features"), arch, (64, 64), False)
    message = str(info.value)
    assert "\n" not in message and "MobileNetV2 weights without the classifier" in message


# --- work that starts, then stops ---------------------------------------------------------------------------


def test_sigterm_stops_run_and_removes_its_temporary_folder(probe, tmp_path):
    photos = tmp_path / "photos"
    probe_model.make_images(photos, 12)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "PROBE_SLEEP": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "BATCHINFER_CUSTOM_OBJECTS": "tests.probe_model:CUSTOM_OBJECTS"}
    proc = subprocess.Popen([str(BIN / "batchinfer"), "run", str(photos), "--model-path", str(probe), "--preprocess",
                             "none", "--batch-size", "2", "--shard-size", "4", "-q", "--output",
                             str(tmp_path / "out.parquet")], env=env, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: list(scratch.glob("batchinfer-*/shard-*.parquet")) or proc.poll() is not None, 120,
               "the first shard file")
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "batchinfer: terminated" and "Traceback" not in err
    assert not list(scratch.iterdir()), "the temporary shard folder is removed"
    assert not (tmp_path / "out.parquet").exists()


# --- what the output says about itself ---------------------------------------------------------------------


def test_metadata_tells_the_truth(probe, tmp_path):
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "BATCHINFER_CUSTOM_OBJECTS": "tests.probe_model:CUSTOM_OBJECTS"}
    probe_model.make_images(tmp_path / "photos", 3)
    out = tmp_path / "probe.parquet"
    batchinfer("run", str(tmp_path / "photos"), "--model-path", str(probe), "--top-k", "5", "-q", "--output",
               str(out), env=env)
    meta = read_job_metadata(pq.read_schema(out))
    assert meta["top_k"] == 3 and meta["top_k_requested"] == 5, "a 3-class model gives 3 classes, and says so"
    assert {len(v) for v in pq.read_table(out)["top_k_labels"].to_pylist()} == {3}
    assert meta["preprocess"] == "none"

    small = tmp_path / "small.parquet"
    batchinfer("run", str(PHOTOS), "--weights", "none", "--input-size", "96", "-q", "--output", str(small))
    meta = read_job_metadata(pq.read_schema(small))
    assert meta["preprocess"] == "tf", "MobileNetV2's own preprocessing ran: the tf family"
    assert meta["top_k"] == 5 and "top_k_requested" not in meta


def test_quiet_run_prints_no_tensorflow_start_up_lines(tmp_path):
    quiet = batchinfer("run", str(PHOTOS), "--weights", "none", "--input-size", "96", "-q", "--output",
                       str(tmp_path / "a.csv"))
    assert quiet.stderr.strip().splitlines() == [f"wrote 5 rows to {tmp_path / 'a.csv'}"]
    verbose = batchinfer("run", str(PHOTOS), "--weights", "none", "--input-size", "96", "-q", "--verbose",
                         "--output", str(tmp_path / "b.csv"))
    assert len(verbose.stderr.strip().splitlines()) > 1, "--verbose shows what TensorFlow says"


def test_run_table_with_several_layers(tmp_path):
    out = tmp_path / "f.csv"
    proc = batchinfer("run", str(PHOTOS), "--weights", "none", "--input-size", "96", "--task", "features",
                      "--layer", "block_1_expand", "--layer", "BLOCK_2_ADD", "--output", str(out))
    header = proc.stdout.splitlines()[0].split()
    assert header == ["file", "features_block_1_expand", "features_block_2_add", "error"]
    assert "96 floats" in proc.stdout and "24 floats" in proc.stdout
    assert "1 rows" not in proc.stderr


def test_a_single_row_is_one_row(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    (one / "cat.jpg").write_bytes((PHOTOS / "cat.jpg").read_bytes())
    proc = batchinfer("run", str(one), "--weights", "none", "--input-size", "96", "-q", "--output",
                      str(tmp_path / "a.csv"))
    assert proc.stderr.strip().endswith(f"wrote 1 row to {tmp_path / 'a.csv'}")


def test_help_states_defaults_and_task_choices(cli):
    text = cli("run", "--help").stdout
    assert "default MobileNetV2" in " ".join(text.split())
    assert "{classify,features,classify,features}" not in text
    assert "classify|features|classify,features" in text



def test_a_worker_that_cannot_write_the_output_says_so_before_loading_the_model(redis_url, redis_client, probe,
                                                                               tmp_path):
    """The output folder became a file after submit (say a mount missing on that worker): each attempt fails
    with that one reason before the model is loaded, is retried with backoff (the machine's trouble may
    pass), and the shard is dead-lettered with the reason when attempts run out."""
    probe_model.make_images(tmp_path / "photos", 4)
    job = submit_probe(tmp_path / "photos", probe, redis_url, env={"BATCHINFER_SPOOL": str(tmp_path / "spool")})
    (tmp_path / "out").write_text("not a folder any more")
    worker = start_probe_worker(redis_url, tmp_path, "cannot-write", BATCHINFER_MAX_ATTEMPTS="2",
                                BATCHINFER_RETRY_BACKOFF="1")
    try:
        status = wait_until(lambda: (s := batchinfer("status", job, broker=redis_url, check=False)).returncode == 1
                            and s, 120, "the shard to fail")
    finally:
        worker.stop()
    assert "(2 attempts)" in status.stdout and "is a file, not a folder" in status.stdout, status.stdout
    assert "built custom" not in worker.text(), "the model was never loaded"
