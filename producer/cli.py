"""The ``batchinfer`` command line: submit, status, collect and the embedded run.

This module never imports TensorFlow (``run`` imports it only when it starts working), so the
producer commands start fast on machines without a GPU stack. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

from producer.args import PROG, build_parser, check_args
from producer.config import check_runnable_here, model_spec_from_args
from producer.keep import parse_names
from producer.sources import Filters
from producer.words import plural
from workers.contract import OutputSpec
from workers.errors import BatchInferError, ConfigError


def _cmd_run(args: argparse.Namespace) -> int:
    from producer.collect import format_for
    from producer.embedded import results_table, run
    from workers.storage import check_writable

    spec = model_spec_from_args(args)
    check_runnable_here(spec)
    filters = Filters(tuple(args.include), tuple(args.exclude))
    fmt = format_for(args.output, args.format)
    keep = parse_names(args.keep_columns) if args.keep_columns is not None else ()
    check_writable(args.output)  # before the model is built or an image read
    _, rows = run(args.sources, spec, args.output, fmt=fmt, filters=filters, shard_size=args.shard_size,
                  progress=not args.quiet, skip_unchanged=args.skip_unchanged, keep_columns=keep)
    if not args.quiet:
        print(results_table(args.output, fmt))
    print(f"wrote {plural(rows, 'row')} to {args.output}", file=sys.stderr)
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from producer.config import missing_files
    from producer.submit import resume, settings_with_broker, submit
    from workers.sinks import sink_class

    if args.resume:
        if (args.sources or args.job_id or args.skip_unchanged or args.output or args.ttl is not None
                or args.keep_columns is not None):
            raise ConfigError("--resume JOB takes no sources, --job-id, --output, --ttl, --skip-unchanged or "
                              "--keep-columns: they come from the job")
        print(resume(args.resume, settings_with_broker(args.broker), progress=not args.quiet))
        return 0
    if not args.sources:
        raise ConfigError("submit needs at least one SOURCE (or --resume JOB)")
    keep = parse_names(args.keep_columns) if args.keep_columns is not None else ()
    spec = model_spec_from_args(args, files_must_exist=False)
    for path in missing_files(spec):
        print(f"{PROG}: warning: {path} is not on this machine; workers must have it", file=sys.stderr)
    if args.sink == "parquet" and not args.output:
        raise ConfigError("the parquet sink needs --output DIR (or use --sink redis)")
    if args.sink == "redis" and args.output:
        raise ConfigError("--output is the parquet sink's folder; the redis sink writes to $BATCHINFER_REDIS_URL "
                          "(drop --output, or use --sink parquet)")
    if args.sink != "redis" and args.ttl is not None:
        raise ConfigError("--ttl applies to --sink redis (Parquet files do not expire)")
    path = args.output
    if path and "://" not in path:  # a local folder: absolute, so every worker reads it the same way
        path = os.path.abspath(path)
    output = OutputSpec(sink=args.sink, path=path, ttl=args.ttl or 0)
    sink_class(output.sink).check(output)  # the folder (or S3 prefix) can be written: before any work
    filters = Filters(tuple(args.include), tuple(args.exclude))
    job_id = submit(args.sources, spec, output, settings_with_broker(args.broker), filters=filters,
                    shard_size=args.shard_size, job_id=args.job_id, progress=not args.quiet,
                    skip_unchanged=args.skip_unchanged, keep_columns=keep)
    print(job_id)
    return 0


def _store(args: argparse.Namespace) -> tuple:
    from producer.jobs import connect_store
    from producer.submit import settings_with_broker

    settings = settings_with_broker(args.broker)
    return settings, connect_store(settings)


def _cmd_status(args: argparse.Namespace) -> int:
    """Exit 1 when shards failed for good (they need `retry`)."""
    from producer.collect import get_job, wait_for
    from producer.status import print_status

    settings, store = _store(args)
    job = wait_for(store, args.job_id, interval=args.interval) if args.watch else get_job(store, args.job_id)
    print_status(job, live_workers=store.live_workers(job.queue, 3 * settings.heartbeat_seconds))
    if args.shards:
        from producer.status import shard_lines

        print(shard_lines(store.list_shards(args.job_id, args.shards, args.limit), args.shards))
    return 1 if job.n_failed else 0


def _cmd_jobs(args: argparse.Namespace) -> int:
    from producer.status import jobs_table

    _, store = _store(args)
    print(jobs_table(store.recent_jobs(args.limit)))
    return 0


def _cmd_retry(args: argparse.Namespace) -> int:
    from producer.collect import get_job

    _, store = _store(args)
    job = get_job(store, args.job_id)
    if job.cancelled:
        raise ConfigError(f"job {args.job_id} was cancelled; submit it again")
    shards = store.retry(args.job_id, args.shard)
    if not shards:
        what = "none of those shards can be retried (running?)" if args.shard else "no failed shards"
        print(f"{PROG}: job {args.job_id}: {what}", file=sys.stderr)
        return 1
    print(f"requeued {plural(len(shards), 'shard')} of job {args.job_id}: "
          f"{', '.join(f'shard-{s:06d}' for s in shards[:10])}{' ...' if len(shards) > 10 else ''}", file=sys.stderr)
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    from producer.collect import get_job

    _, store = _store(args)
    job = get_job(store, args.job_id)
    if job.finished and not job.cancelled:
        raise ConfigError(f"job {args.job_id} has already finished")
    store.cancel(args.job_id)
    print(f"cancelled job {args.job_id}: queued shards will not start; {job.n_running} running shards stop at "
          "their next batch", file=sys.stderr)
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    _, store = _store(args)
    deleted = store.delete(args.job_id, rows=args.rows)
    if not deleted:
        raise ConfigError(f"unknown job {args.job_id!r}")
    print(f"deleted job {args.job_id} ({plural(deleted, 'key')})", file=sys.stderr)
    return 0


def _cmd_collect(args: argparse.Namespace) -> int:
    from producer.collect import collect, format_for
    from producer.jobs import connect_rows, connect_store
    from producer.submit import settings_with_broker
    from workers.storage import check_writable

    fmt = format_for(args.output, args.format)
    check_writable(args.output)  # before waiting or reading a row
    settings = settings_with_broker(args.broker)
    store = connect_store(settings)
    redis_rows = None
    job = store.get_job(args.job_id)
    if job is not None and job.spec["output"]["sink"] == "redis":
        redis_rows = connect_rows(settings)
    started = time.monotonic()
    rows = collect(store, args.job_id, args.output, fmt, wait=args.wait, allow_partial=args.allow_partial,
                   timeout=args.timeout, redis_rows=redis_rows)
    print(f"collected {plural(rows, 'row')} into {args.output} in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from producer.inspect import cmd_models

    return cmd_models(args)


def _cmd_layers(args: argparse.Namespace) -> int:
    from producer.inspect import cmd_layers

    return cmd_layers(args)


def _cmd_train_head(args: argparse.Namespace) -> int:
    from producer.train_head import train_head

    if args.epochs < 1:
        raise ConfigError("--epochs must be at least 1")
    report = train_head(args.features, args.output, args.labels_from, args.head, args.epochs, args.holdout,
                        args.seed)
    print(f"saved {args.output} ({len(report['classes'])} classes: {', '.join(report['classes'])}); "
          f"run it with: batchinfer run IMAGES --model-path {args.output} --output results.csv", file=sys.stderr)
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from producer.index import build_index, summary
    from producer.words import parse_size

    budget = parse_size(args.max_memory, "--max-memory") if args.max_memory is not None else None
    info = build_index(args.features, args.output, column=args.column, metric=args.metric, max_memory=budget,
                       kind=args.kind, progress=not args.quiet)
    print(summary(info, args.output), file=sys.stderr)
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from producer.search import run

    print(run(args.index, args.queries, args.k, args.output, args.format, embed_all=args.embed), file=sys.stderr)
    return 0


MODEL_OPTIONS = ("model", "weights", "task", "top_k", "pooling", "layer", "input_size", "input_shape", "model_path",
                 "labels", "preprocess", "precision", "batch_size")


def _cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses

    from producer.words import parse_size
    from workers.serve.server import serve
    from workers.serve.service import ServeConfig

    defaults = build_parser().parse_args(["serve"])
    if args.batch_size != defaults.batch_size:
        raise ConfigError("serve batches by --max-batch (and --max-wait-ms), not --batch-size")
    index = None
    if args.index:
        given = [name for name in MODEL_OPTIONS if getattr(args, name) != getattr(defaults, name)]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise ConfigError(f"{flag}: with --index the service runs the index's own model; give no model options")
        from workers.search.index import SearchIndex

        index = SearchIndex.load(args.index)
        spec = dataclasses.replace(index.spec, decode=args.decode)
    else:
        spec = model_spec_from_args(args)
    config = ServeConfig(spec=spec, host=args.host, port=args.port, max_batch=args.max_batch,
                         max_wait_ms=args.max_wait_ms, max_body=parse_size(args.max_body, "--max-body"),
                         max_images=args.max_images, index=args.index, allow_uris=tuple(args.allow_uri),
                         token=os.environ.get("BATCHINFER_API_TOKEN") or None).checked()
    return serve(config, index=index, log_level="info" if args.verbose else "warning")


def _cmd_report(args: argparse.Namespace) -> int:
    from producer.report import report_command

    return report_command(args)


def _cmd_exporter(args: argparse.Namespace) -> int:
    from producer.exporter import exporter_command

    return exporter_command(args)


COMMANDS = {"run": _cmd_run, "serve": _cmd_serve, "submit": _cmd_submit, "status": _cmd_status, "collect": _cmd_collect,
            "models": _cmd_models, "layers": _cmd_layers, "train-head": _cmd_train_head, "jobs": _cmd_jobs,
            "retry": _cmd_retry, "cancel": _cmd_cancel, "delete": _cmd_delete, "index": _cmd_index,
            "search": _cmd_search, "report": _cmd_report, "exporter": _cmd_exporter}


class Terminated(BatchInferError):
    """SIGTERM (what ``timeout``, systemd and Kubernetes send): unwinds like Ctrl-C, so temporary files go."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated("terminated")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    in_main = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    try:
        from workers.settings import Settings

        Settings.from_env()  # a bad BATCHINFER_* variable is one line here, whatever the command
        check_args(args)
        return COMMANDS[args.command](args)
    except Terminated:
        print(f"{PROG}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BatchInferError as exc:
        from workers.settings import redact_text

        print(f"{PROG}: error: {redact_text(str(exc))}", file=sys.stderr)  # a URL quoted by a library, redacted
        return 2 if isinstance(exc, ConfigError) else 1
    except ImportError as exc:  # e.g. `run` on a machine without the Keras backend's framework
        from workers.models.backends import install_hint

        hint = "" if "pip install" in str(exc) else f" (install it: {install_hint()})"  # faiss says its own
        print(f"{PROG}: error: {exc}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
