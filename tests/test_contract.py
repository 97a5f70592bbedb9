"""The task contract, the Celery configuration and the architecture registry (no TensorFlow needed)."""

from __future__ import annotations

import json

import pytest

from workers.app import celery_config
from workers.contract import TASK_NAME, ModelSpec, OutputSpec, ShardList, ShardTask, message, shard_name, spec_dicts
from workers.errors import ConfigError
from workers.models.registry import ARCHITECTURES, get_architecture, layer_names, resolve_layer
from workers.settings import Settings

# --- task messages -----------------------------------------------------------------------------------


def _task() -> ShardTask:
    return ShardTask(
        job_id="20250101-000000-abcdef",
        shard_id=7,
        uris=["/data/a.jpg", "s3://bucket/b.png", "/data/ünïcode ✓.jpg"],
        model=ModelSpec(name="VGG16", weights="/w/vgg.h5", task="features", top_k=3, pooling="max",
                        layers=("block4_pool",), input_shape=(256, 256), decode="keras", batch_size=16),
        output=OutputSpec(sink="redis", path=None, ttl=3600),
    )


def test_shard_task_round_trips_through_json():
    task = _task()
    wire = json.dumps(task.to_dict())
    back = ShardTask.from_dict(json.loads(wire))
    assert back == task
    assert isinstance(back.model, ModelSpec) and isinstance(back.output, OutputSpec)
    assert back.model.layers == ("block4_pool",) and back.output.ttl == 3600


def test_default_shard_task_round_trips_with_nulls():
    task = ShardTask("job", 0, [])
    data = json.loads(json.dumps(task.to_dict()))
    assert data["model"]["layers"] == [] and data["model"]["input_shape"] is None
    assert data["output"]["path"] is None
    assert ShardTask.from_dict(data) == task


def test_to_dict_is_plain_json_types():
    data = _task().to_dict()
    assert set(data) == {"job_id", "shard_id", "uris", "model", "output"}
    assert isinstance(data["model"], dict) and isinstance(data["output"], dict)
    assert json.loads(json.dumps(data)) == data


def test_from_dict_tolerates_missing_and_unknown_fields():
    data = _task().to_dict()
    data["model"]["added_in_a_later_version"] = True
    data["output"].pop("ttl")
    data["extra"] = "ignored"
    back = ShardTask.from_dict(data)
    assert back.model == _task().model
    assert back.output.ttl == 0
    minimal = ShardTask.from_dict({"job_id": "j", "shard_id": "3", "uris": ["x.jpg"]})
    assert minimal == ShardTask("j", 3, ["x.jpg"])


def test_kept_columns_travel_in_the_output_spec_and_beside_inline_uris():
    output = OutputSpec(sink="parquet", path="/out", keep_columns=(("id", "int64"), ("caption", "string")))
    task = ShardTask("j", 1, ["/a.jpg", "/b.jpg"], ModelSpec(), output,
                     columns={"id": [1, None], "caption": ["x", "y"]})
    wire = json.loads(json.dumps(task.to_dict()))
    assert wire["output"]["keep_columns"] == [["id", "int64"], ["caption", "string"]]
    assert wire["columns"] == {"id": [1, None], "caption": ["x", "y"]}
    back = ShardTask.from_dict(wire)
    assert back == task and back.output.keep_names == ["id", "caption"]
    by_ref = message("j", 1, spec_dicts(ModelSpec(), output), task.uris, "state:", task.columns)
    assert "columns" not in by_ref and "uris" not in by_ref, "with a pointer, the values stay with the URIs"


@pytest.mark.parametrize("listed, body", [
    (ShardList(["/a.jpg"]), ["/a.jpg"]),
    (ShardList(["/a.jpg"], {"id": [3]}), {"uris": ["/a.jpg"], "columns": {"id": [3]}}),
    (ShardList(["/a.jpg"], {}, {"files": ["/p.parquet"], "rows": [[0, 4]]}),
     {"uris": ["/a.jpg"], "files": ["/p.parquet"], "rows": [[0, 4]]}),
    (ShardList(["/a.jpg"], {"id": [3]}, {"files": ["/p.parquet"], "rows": [[0, 4]]}),
     {"uris": ["/a.jpg"], "columns": {"id": [3]}, "files": ["/p.parquet"], "rows": [[0, 4]]}),
])
def test_shard_list_bodies_and_the_old_forms(listed, body):
    """A list with nothing beside its URIs is written as the plain list earlier versions wrote; carry bodies
    written before kept columns existed read as they did."""
    assert listed.body() == body
    assert ShardList.from_body(json.loads(json.dumps(body))) == listed


def test_shard_lists_round_trip_through_the_spool_and_the_job_state(tmp_path):
    import gzip
    import zlib

    from workers.redis_jobstore import pack_shard_list, unpack_shard_list
    from workers.spool import read_shard_list, write_shard_list

    listed = ShardList(["/a.jpg", "/b.jpg"], {"id": [1, None], "ok": [True, False]})
    write_shard_list(str(tmp_path / "s.uris.gz"), listed)
    assert read_shard_list(str(tmp_path / "s.uris.gz")) == listed
    assert unpack_shard_list(pack_shard_list(listed)) == listed
    (tmp_path / "old.uris.gz").write_bytes(gzip.compress(b'["/a.jpg"]'))  # written by an earlier version
    assert read_shard_list(str(tmp_path / "old.uris.gz")) == ShardList(["/a.jpg"])
    assert unpack_shard_list(zlib.compress(b'["/a.jpg"]')) == ShardList(["/a.jpg"])


def test_shard_name():
    assert shard_name(7) == "shard-000007"
    assert shard_name(0) == "shard-000000"
    assert shard_name(123456) == "shard-123456"
    assert _task().name == "shard-000007"


def test_cache_key_is_deterministic_and_distinguishes_specs():
    a, b = ModelSpec(), ModelSpec()
    assert a.cache_key() == b.cache_key()
    assert ModelSpec(name="ResNet50").cache_key() != a.cache_key()
    assert json.loads(a.cache_key())["name"] == "MobileNetV2"


# --- Celery configuration ----------------------------------------------------------------------------


def test_celery_config_is_json_only_with_late_acks():
    config = celery_config(Settings(), env={})
    assert config["accept_content"] == ["json"]
    assert config["task_serializer"] == "json"
    assert config["result_serializer"] == "json"
    assert config["task_acks_late"] is True
    assert config["task_reject_on_worker_lost"] is True
    assert config["worker_prefetch_multiplier"] == 1
    assert config["worker_concurrency"] == 1
    assert config["broker_transport_options"]["visibility_timeout"] > 3600
    assert config["task_routes"][TASK_NAME]["queue"] == config["task_default_queue"] == "batchinfer"


def test_celery_setting_overridden_from_the_env_dict():
    env = {"BATCHINFER_CELERY_WORKER_CONCURRENCY": "3", "BATCHINFER_CELERY_TASK_DEFAULT_QUEUE": "gpu",
           "UNRELATED": "1", "BATCHINFER_CELERY_": "ignored"}
    config = celery_config(Settings(), env=env)
    assert config["worker_concurrency"] == 3  # parsed as JSON, so an int
    assert config["task_default_queue"] == "gpu"  # not JSON, kept as a string
    assert "" not in config and "unrelated" not in config
    assert celery_config(Settings(), env={})["worker_concurrency"] == 1  # the env dict, not os.environ


def test_settings_from_env_dict_reach_the_celery_config():
    env = {"BATCHINFER_VISIBILITY_TIMEOUT": "7200", "BATCHINFER_BROKER_URL": "redis://broker:6379/1",
           "BATCHINFER_QUEUE": "q2"}
    settings = Settings.from_env(env)
    assert settings.visibility_timeout == 7200
    assert settings.state_url == "redis://broker:6379/1"  # the state store follows the broker
    config = celery_config(settings, env=env)
    assert config["broker_transport_options"] == {"visibility_timeout": 7200}
    assert config["broker_url"] == "redis://broker:6379/1"
    assert config["task_default_queue"] == "q2"


def test_settings_default_visibility_timeout_exceeds_an_hour():
    assert Settings.from_env({}).visibility_timeout > 3600


def test_bad_integer_setting_is_reported_by_name():
    with pytest.raises(ValueError, match="BATCHINFER_VISIBILITY_TIMEOUT"):
        Settings.from_env({"BATCHINFER_VISIBILITY_TIMEOUT": "six hours"})


# --- architecture registry ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet50", "ResNet50", "RESNET50"])
def test_get_architecture_is_case_insensitive(name):
    arch = get_architecture(name)
    assert arch.name == "ResNet50"
    assert arch.module == "keras.applications.resnet50"


@pytest.mark.parametrize("typo, suggestion", [("resnet5", "ResNet50"), ("vgg", "VGG16"),
                                              ("mobilenetv4", "MobileNetV2"), ("densenet", "DenseNet121")])
def test_unknown_architecture_suggests_the_closest(typo, suggestion):
    with pytest.raises(ConfigError, match=f"did you mean {suggestion}") as info:
        get_architecture(typo)
    assert isinstance(info.value, ValueError)
    assert repr(typo) in str(info.value)


def test_unrelated_architecture_name_lists_known_ones():
    with pytest.raises(ConfigError) as info:
        get_architecture("xyz")
    message = str(info.value)
    assert "did you mean" not in message
    for arch in ARCHITECTURES.values():
        assert arch.name in message


def test_every_architecture_has_layer_names():
    for arch in ARCHITECTURES.values():
        assert arch.min_size <= arch.default_size
        notop, full = layer_names(arch, False), layer_names(arch, True)
        assert notop and len(full) > len(notop)


def test_resolve_layer_vgg16():
    vgg = get_architecture("VGG16")
    index, needs_top = resolve_layer(vgg, "block4_pool")
    assert needs_top is False
    assert layer_names(vgg, include_top=False)[index] == "block4_pool"
    index, needs_top = resolve_layer(vgg, "fc1")  # only the full model has it
    assert needs_top is True
    assert layer_names(vgg, include_top=True)[index] == "fc1"


def test_resolve_unknown_layer_lists_valid_names():
    vgg = get_architecture("VGG16")
    with pytest.raises(ConfigError) as info:
        resolve_layer(vgg, "nope")
    message = str(info.value)
    assert "'nope'" in message and "VGG16" in message
    assert "Valid layers:" in message
    for name in ("block1_conv1", "block4_pool", "fc1", "predictions"):
        assert name in message


def test_resolve_layer_typo_suggests_close_names():
    with pytest.raises(ConfigError, match="Did you mean: .*block4_pool"):
        resolve_layer(get_architecture("VGG16"), "block4_poll")
