"""``batchinfer run``: submit, work and collect in one process, with no Redis server.

It drives the same ``run_attempt`` function (``workers.attempt.run_shard``) and Parquet sink as a
cluster worker, with the job state in memory and the shard files in a temporary folder that is
removed afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

from tqdm import tqdm

from producer.collect import collect
from producer.dedupe import duplicates_line
from producer.incremental import Previous
from producer.jobs import new_job_id
from producer.keep import kept_columns
from producer.shards import ShardStream
from producer.sources import Filters, check_sources
from producer.words import plural
from workers.confine import check_model
from workers.contract import ModelSpec, OutputSpec, ShardList, ShardTask
from workers.errors import SourceError
from workers.jobstate import MemoryJobStore
from workers.settings import Settings
from workers.spool import FOLDER, shard_ref, write_shard_list


def run(
    sources: list[str], model: ModelSpec, output: str, *, fmt: str | None = None, filters: Filters = Filters(),
    shard_size: int = 256, progress: bool = True, allow_partial: bool = False, skip_unchanged: str | None = None,
    keep_columns: Sequence[str] = (),
) -> tuple[str, int]:
    """Process every image of ``sources`` into ``output``; return (job id, rows written). With
    ``skip_unchanged`` (a previous output), unchanged images reuse their rows (``producer.incremental``);
    ``keep_columns`` are manifest columns copied into every row (``producer.keep``)."""
    check_sources(sources)
    keep = kept_columns(sources, keep_columns, model)
    previous = Previous(skip_unchanged, model) if skip_unchanged else None
    from workers.attempt import run_shard
    from workers.feed import feeder, prime_images
    from workers.models.loader import PredictorCache, input_hw

    settings = Settings.from_env()
    roots = settings.allowed_roots  # as a worker would have them: the model and the output are checked first
    check_model(model, roots)
    roots.check(output, "output")
    # a listing first (duplicates dropped as the job will), for the bar's total and ETA
    total = sum(len(listed.uris) for _, listed in ShardStream(sources, filters, shard_size)) if progress else None
    if total == 0:
        raise SourceError(f"no images found in {' '.join(sources)}")
    cache = PredictorCache(maxsize=1)
    feed = feeder(settings.io_threads)
    store = MemoryJobStore()
    job_id = new_job_id()
    workdir = tempfile.mkdtemp(prefix=f"batchinfer-{job_id}-")
    settings = replace(settings, allowed_roots=roots.extended(workdir))  # its own shard files
    out_spec = OutputSpec(sink="parquet", path=workdir, keep_columns=keep)
    stream = ShardStream(sources, filters, shard_size, keep, previous)
    bar: tqdm[Any] | None = None
    n_shards = count = reused = 0

    def task_of(shard: tuple[int, ShardList]) -> ShardTask:
        return ShardTask(job_id, shard[0], shard[1].uris, model, out_spec, columns=shard[1].columns)

    try:
        # the first shards decode on one thread while the model is built (when its input size is known; not
        # in keras mode, whose decoder imports Keras: two threads importing TensorFlow at once can deadlock)
        ahead: deque[tuple[int, ShardList]] = deque()
        guess = input_hw(model) if model.decode != "keras" else None
        if guess is not None:
            budget = prime_images(guess, model.decode)
            while budget > 0 and (shard := next(stream, None)) is not None:  # carry shards count: bounded look-ahead
                ahead.append(shard)
                budget -= len(shard[1].uris)
            feed.prime([task_of(s) for s in ahead if s[1].carry is None], guess, settings.allowed_roots)
        try:  # the model first: its errors come before any progress bar, and the bar times images only
            size = cache.get(model).input_hw
        finally:
            feed.ready()
        if size != guess:  # built at another size than its registry entry said: what was decoded is no use
            feed.cancel_announced()
            ahead_ids: set[int] = set()
        else:
            ahead_ids = {shard_id for shard_id, _ in ahead}
        store.create_job(job_id, {"model": asdict(model), "output": asdict(out_spec), "sources": sources})
        bar = tqdm(desc="run", total=total, unit="img", file=sys.stderr, disable=not progress, dynamic_ncols=True)
        upcoming = ahead.popleft() if ahead else next(stream, None)
        while upcoming is not None:
            shard_id, listed = upcoming
            upcoming = ahead.popleft() if ahead else next(stream, None)
            if upcoming is not None and upcoming[1].carry is None and upcoming[0] not in ahead_ids:
                # it loads while this shard's last batches run
                feed.announce(task_of(upcoming), size, settings.allowed_roots)
            store.add_shard(job_id, shard_id, listed.uris)
            task = task_of((shard_id, listed))
            if listed.carry is not None:  # the worker reads a carry shard's list from the spool, as on a cluster
                ref = shard_ref(f"{workdir}/{FOLDER}/{job_id}", shard_id)
                write_shard_list(ref, listed)
                task = ShardTask(job_id, shard_id, [], model, out_spec, uris_ref=ref)
                reused += len(listed.uris)
            run_shard(task, store, cache.get, settings, on_batch=bar.update)
            if listed.carry is not None:
                bar.update(len(listed.uris))
            n_shards, count = n_shards + 1, count + len(listed.uris)
        if not n_shards:
            raise SourceError(f"no images found in {' '.join(sources)}")
        store.finish_submit(job_id, n_shards, count)
        bar.close()
        if stream.duplicates:
            print(duplicates_line(stream.duplicates), file=sys.stderr)
        if previous is not None:
            print(f"processed {plural(count - reused, 'image')}, reused {plural(reused, 'row')} from {skip_unchanged}",
                  file=sys.stderr)
        rows = collect(store, job_id, output, fmt, allow_partial=allow_partial, progress=False)
    finally:
        feed.cancel_announced()
        if bar is not None:
            bar.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return job_id, rows


def results_table(path: str, fmt: str, limit: int = 50) -> str:
    """A short text table of the output (top-1 label and score, or feature size, or the error)."""
    import pandas as pd

    frame: Any
    if fmt == "parquet":
        frame = pd.read_parquet(path)
    elif fmt == "csv":
        frame = pd.read_csv(path)
    else:
        frame = pd.read_json(path, lines=True)
    def size(value: Any) -> str:
        if isinstance(value, str):  # CSV keeps lists as JSON text
            value = json.loads(value)
        return "-" if value is None or (isinstance(value, float) and value != value) else f"{len(value)} floats"

    frame = frame.assign(file=frame["uri"].map(os.path.basename))
    cols = ["file"] + (["label", "score"] if "label" in frame else [])
    for column in [c for c in frame.columns if c == "features" or c.startswith("features_")]:
        frame[column] = frame[column].map(size)
        cols.append(column)
    frame = frame[[*cols, "error"]].fillna("")
    text = frame.head(limit).to_string(index=False)
    if len(frame) > limit:
        text += f"\n... {len(frame) - limit} more rows in {path}"
    return text
