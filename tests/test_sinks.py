"""Every sink passes the same contract: rows round-trip, a re-run replaces, an abort keeps the old rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from producer.collect import shard_tables
from workers.contract import ModelSpec, OutputSpec, ShardTask
from workers.jobstate import DONE, Holder, MemoryJobStore
from workers.schema import build_batch, output_schema
from workers.settings import Settings
from workers.sinks import open_sink, sink_class

DIM = 4


def _batch(schema: pa.Schema, uris: list[str], scale: float) -> pa.RecordBatch:
    ok = [i for i, u in enumerate(uris) if not u.endswith("bad.jpg")]
    errors = [None if i in ok else "not an image" for i in range(len(uris))]
    feats = np.arange(len(ok) * DIM, dtype=np.float32).reshape(len(ok), DIM) * scale
    return build_batch(schema, uris, errors, [(10, 20) if i in ok else None for i in range(len(uris))], ok,
                       {"features": feats})


@pytest.fixture(params=["parquet", "redis"])
def sink_setup(request, tmp_path):
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        request.getfixturevalue("redis_client")  # empty database
        settings = Settings(broker_url=url, state_url=url, redis_sink_url=url)
        output = OutputSpec(sink="redis")
    else:
        settings = Settings()
        output = OutputSpec(sink="parquet", path=str(tmp_path / "out"))
    return output, settings


def _read(job_id: str, output: OutputSpec, settings: Settings, shard_id: int = 0) -> pa.Table:
    from workers.sinks.redis import RedisRows

    store = MemoryJobStore()
    store.create_job(job_id, {"model": {"task": "features", "top_k": 5}, "output": output.__dict__})
    store.add_shard(job_id, shard_id, [])
    holder = Holder("test")
    store.begin(job_id, shard_id, holder, 60, 1)
    store.finish(job_id, shard_id, holder.token, {"images": 0, "errors": 0})
    assert store.get_job(job_id).shards[shard_id]["state"] == DONE
    rows = RedisRows.from_settings(settings) if output.sink == "redis" else None
    return pa.concat_tables(list(shard_tables(store.get_job(job_id), output, rows)))


def test_sink_contract(sink_setup):
    output, settings = sink_setup
    schema = output_schema("features", feature_dim=DIM)
    task = ShardTask("job1", 0, [], ModelSpec(task="features"), output)
    uris = ["/a/1.jpg", "/a/bad.jpg", "/a/2.jpg"]

    with open_sink(task, schema, settings) as sink:
        sink.write(_batch(schema, uris[:2], 1.0))
        sink.write(_batch(schema, uris[2:], 1.0))
    table = _read("job1", output, settings)
    assert table.column("uri").to_pylist() == uris, "one row per image, in input order"
    assert table.column("error").to_pylist() == [None, "not an image", None]
    assert table.column("features").to_pylist()[1] is None
    np.testing.assert_allclose(table.column("features").to_pylist()[2], [0, 1, 2, 3])
    assert table.column("width").to_pylist() == [10, None, 10]

    # a re-run replaces the shard's rows: never two copies
    with open_sink(task, schema, settings) as sink:
        sink.write(_batch(schema, uris, 2.0))
    table = _read("job1", output, settings)
    assert table.column("uri").to_pylist() == uris
    np.testing.assert_allclose(table.column("features").to_pylist()[0], [0, 2, 4, 6])

    # a crash mid-shard leaves the committed rows as they were
    with pytest.raises(RuntimeError):
        with open_sink(task, schema, settings) as sink:
            sink.write(_batch(schema, uris[:1], 5.0))
            raise RuntimeError("worker died")
    table = _read("job1", output, settings)
    assert table.column("uri").to_pylist() == uris
    np.testing.assert_allclose(table.column("features").to_pylist()[0], [0, 2, 4, 6])


def test_unknown_sink_suggests():
    from workers.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean parquet"):
        sink_class("parquett")


def test_sink_knows_its_committed_shards(sink_setup, tmp_path):
    """A new attempt asks the sink whether an earlier one committed the shard (then it is not redone)."""
    from workers.schema import with_job_metadata

    output, settings = sink_setup
    uris = ["/a/1.jpg", "/a/bad.jpg", "/a/2.jpg"]
    task = ShardTask("job2", 3, uris, ModelSpec(task="features"), output)
    schema = with_job_metadata(output_schema("features", feature_dim=DIM), {"job_id": "job2", "shard_id": 3})
    sink = sink_class(output.sink)
    assert sink.committed(task, settings) is None, "nothing committed yet"
    with pytest.raises(RuntimeError), open_sink(task, schema, settings) as open_:
        open_.write(_batch(schema, uris, 1.0))
        raise RuntimeError("killed before the commit")
    assert sink.committed(task, settings) is None, "an aborted attempt commits nothing"
    with open_sink(task, schema, settings) as open_:
        open_.write(_batch(schema, uris, 1.0))
    assert sink.committed(task, settings) == {"images": 3, "errors": 1}
    other_job = ShardTask("job3", 3, uris, ModelSpec(task="features"), output)
    assert sink.committed(other_job, settings) is None, "another job's rows in the same place do not count"
    if output.sink == "parquet":  # temporary files that killed attempts left behind are cleared
        stale = tmp_path / "out" / ".shard-000003.parquet.abc123.tmp"
        stale.write_bytes(b"half a file")
        assert sink.committed(task, settings) == {"images": 3, "errors": 1} and not stale.exists()


def test_the_redis_sink_keeps_its_connections_across_shards(redis_url, redis_client):
    """A worker runs shard after shard: the Redis sink's commit check and writes reuse the process's connections
    (a new one per shard would be a TLS handshake per shard with rediss://)."""
    settings = Settings(broker_url=redis_url, state_url=redis_url, redis_sink_url=redis_url)

    def accepted() -> int:
        return int(redis_client.info("stats")["total_connections_received"])

    _redis_shard(settings, "jobc", 0)
    before = accepted()
    for i in range(1, 9):
        _redis_shard(settings, "jobc", i)
    assert accepted() == before, "no new connection for shards 1 to 8"


def test_the_redis_sinks_kept_connections_survive_a_redis_restart(tmp_path):
    """The kept connections die with the server (kill -9, then started again on its data): the next shard
    reconnects instead of failing."""
    from tests.conftest import RedisServer

    server = RedisServer(tmp_path).start()
    try:
        settings = Settings(broker_url=server.url, state_url=server.url, redis_sink_url=server.url)
        for i in range(3):
            _redis_shard(settings, "jobr", i)
            if i == 0:
                server.kill()
                server.start()
    finally:
        server.stop()


def _redis_shard(settings: Settings, job_id: str, shard_id: int) -> None:
    """One shard of one image through the Redis sink as a worker runs it: not committed, written, committed."""
    output, sink = OutputSpec(sink="redis"), sink_class("redis")
    schema = output_schema("features", feature_dim=DIM)
    task = ShardTask(job_id, shard_id, ["/a/1.jpg"], ModelSpec(task="features"), output)
    assert sink.committed(task, settings) is None
    with open_sink(task, schema, settings) as open_:
        open_.write(_batch(schema, ["/a/1.jpg"], 1.0))
    assert sink.committed(task, settings) == {"images": 1, "errors": 0}
