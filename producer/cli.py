"""The ``batchinfer`` command line: submit, status, collect and the embedded run.

This module never imports TensorFlow (``run`` imports it only when it starts working), so the
producer commands start fast on machines without a GPU stack. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import NoReturn

from producer.config import add_model_options, check_runnable_here, model_spec_from_args
from producer.keep import parse_names
from producer.sources import Filters
from producer.words import plural
from workers import __version__
from workers.contract import SINKS, OutputSpec
from workers.errors import BatchInferError, ConfigError
from workers.search.plan import KINDS, METRICS

PROG = "batchinfer"


class Parser(argparse.ArgumentParser):
    """argparse with errors as one line (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _skip_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-unchanged", metavar="PREVIOUS_OUTPUT",
                   help="reuse the rows of images unchanged (URI, size, mtime, S3 ETag) since this earlier output "
                   "of the same model and options (a Parquet file or folder, local or s3://)")


def _source_options(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("sources", nargs="*" if optional else "+", metavar="SOURCE",
                   help="image folder (scanned recursively), s3://bucket/prefix/, image file, or manifest "
                   "(.txt, .csv/.parquet with uri; local or s3://)")
    p.add_argument("--include", action="append", default=[], metavar="GLOB", help="only files matching GLOB")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="skip files matching GLOB")
    p.add_argument("--shard-size", type=int, default=256, help="images per shard/task (default 256)")
    p.add_argument("--keep-columns", metavar="COL,COL",
                   help="copy these columns of the CSV/Parquet manifests into every output row (join keys of your "
                   "own); every source must be such a manifest with those columns")


def _s3_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--s3-endpoint-url", metavar="URL",
                   help="S3-compatible endpoint (MinIO, Ceph) for s3:// URIs in this process; workers read "
                   "their own $AWS_ENDPOINT_URL or $BATCHINFER_S3_ENDPOINT_URL (credentials: boto3's usual chain)")


def _verbose_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", "-v", action="store_true",
                   help="also show TensorFlow's start-up log (hidden by default; its warnings always show)")


def _broker_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", help="Redis URL of the broker and job state "
                   "(default: $BATCHINFER_BROKER_URL or redis://localhost:6379/0)")


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Batch classification and feature extraction with Keras models, "
                    "on one machine (run) or on Celery workers (submit, status, collect).")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("run", help="process images in this process, no servers needed")
    _source_options(p)
    add_model_options(p)
    p.add_argument("--output", "-o", required=True, help="result file (.parquet, .csv or .jsonl)")
    p.add_argument("--format", choices=("parquet", "csv", "jsonl"), help="default: from the file extension")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no results table")
    _verbose_option(p)
    _skip_option(p)
    _s3_option(p)

    p = sub.add_parser("submit", help="enqueue shards for Celery workers; prints the job id last")
    _source_options(p, optional=True)
    add_model_options(p)
    p.add_argument("--output", "-o", help="folder or s3://bucket/prefix/ for the shard Parquet files (parquet sink)")
    p.add_argument("--sink", choices=SINKS, default="parquet", help="parquet (default) or redis")
    p.add_argument("--ttl", type=int, help="with --sink redis: expiry in seconds of the rows (default 0: never)")
    p.add_argument("--job-id", help="name the job: letters, digits, '-', '_', '.' (default: a new timestamped id)")
    p.add_argument("--resume", metavar="JOB", help="carry on with a submit that stopped part way (sources and "
                   "options come from the job)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    _skip_option(p)
    _s3_option(p)
    _broker_option(p)

    p = sub.add_parser("serve", help="HTTP service with a warm model: /predict, /features and /search, requests "
                       "gathered into batches")
    add_model_options(p)
    g = p.add_argument_group("service options")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    g.add_argument("--max-batch", type=int, default=32, metavar="N",
                   help="images per model call at most (default 32): concurrent requests share a call")
    g.add_argument("--max-wait-ms", type=float, default=5.0, metavar="M",
                   help="how long a model call waits for more images when fewer than N are queued (default 5)")
    g.add_argument("--max-images", type=int, default=64, metavar="N", help="images per request at most (default 64)")
    g.add_argument("--max-body", default="32M", metavar="SIZE", help="request body limit (default 32M): 413 above")
    g.add_argument("--index", metavar="DIR", help="a search index (batchinfer index) for /search; the service "
                   "then runs the index's model, so give no model options")
    g.add_argument("--allow-uri", action="append", default=[], metavar="PREFIX",
                   help="let requests name images under this prefix (s3://bucket/, https://host/, /local/folder); "
                   "repeatable; default: uploads only")
    _verbose_option(p)
    _s3_option(p)

    p = sub.add_parser("models", help="the architectures: input size, parameters, feature size, preprocessing")
    p = sub.add_parser("layers", help="index, name and output shape of every layer of a model (for --layer)")
    p.add_argument("model", metavar="MODEL", help="architecture name (case-insensitive)")
    p.add_argument("--top", action="store_true", help="include the classifier head's layers")

    p = sub.add_parser("train-head", help="train a classifier head on a features job's output; save base + head")
    p.add_argument("features", metavar="FEATURES", help="Parquet output of a features job (collect or run)")
    p.add_argument("--labels-from", default="folder", metavar="folder|CSV",
                   help="folder: the image's parent folder name (default); or a CSV with uri,label columns")
    p.add_argument("--output", "-o", required=True, help="the complete model to write (.keras, plus .keras.json)")
    p.add_argument("--head", choices=("logistic", "dense"), default="logistic",
                   help="logistic regression (default) or one hidden Dense layer")
    p.add_argument("--epochs", type=int, default=300)
    _verbose_option(p)
    p.add_argument("--holdout", type=float, default=0.0, help="fraction held out to report accuracy on")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("index", help="a search index (FAISS) of a features job's output, within --max-memory")
    p.add_argument("features", metavar="FEATURES", help="a features job's Parquet output: a file, or a folder or "
                   "s3:// prefix of shard files")
    p.add_argument("--output", "-o", required=True, metavar="DIR",
                   help="the index folder (local or s3://); an index already there is replaced whole")
    p.add_argument("--column", help="the feature column of a multi-layer job (features_<layer>, or the layer name)")
    p.add_argument("--metric", choices=METRICS, default="cosine",
                   help="cosine (default: vectors normalised; scores are similarities, higher is nearer) or l2 "
                   "(Euclidean distances, lower is nearer)")
    p.add_argument("--max-memory", metavar="SIZE", help="memory the build and the loaded index may take, e.g. "
                   "512M, 2G, 1.5GiB (default 2G): the exact index when it fits, else a compressed one")
    p.add_argument("--kind", choices=KINDS, help="this kind of index, if it fits (default: the most exact that fits)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    _s3_option(p)

    p = sub.add_parser("search", help="the nearest indexed images of query images, or of indexed URIs")
    p.add_argument("index", metavar="DIR", help="an index folder made by `batchinfer index` (local or s3://)")
    p.add_argument("queries", nargs="+", metavar="IMAGE_OR_URI",
                   help="an indexed URI (its stored vector, no model) or an image to embed with the index's model")
    p.add_argument("--k", "-k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--output", "-o", help="write rows (query, rank, uri, score, kept columns) to this file "
                   "(.parquet, .csv or .jsonl) instead of printing a table")
    p.add_argument("--format", choices=("parquet", "csv", "jsonl"), help="default: from the file extension")
    p.add_argument("--embed", action="store_true", help="embed every query with the model, indexed URIs too")
    _verbose_option(p)
    _s3_option(p)

    p = sub.add_parser("status", help="progress of a job")
    p.add_argument("job_id", metavar="JOB")
    p.add_argument("--watch", "-w", action="store_true", help="live progress bar until the job finishes")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls with --watch")
    p.add_argument("--shards", choices=("failed", "running", "pending", "done"),
                   help="also list the job's shards in this state (paged by --limit)")
    p.add_argument("--limit", "-n", type=int, default=50, help="with --shards: how many (default 50)")
    _broker_option(p)

    p = sub.add_parser("jobs", help="recent jobs and their state, newest first")
    p.add_argument("--limit", "-n", type=int, default=20, help="how many jobs (default 20)")
    _broker_option(p)

    p = sub.add_parser("retry", help="run a job's failed (dead-lettered) shards again")
    p.add_argument("job_id", metavar="JOB")
    p.add_argument("--shard", type=int, action="append", metavar="N",
                   help="only this shard (repeatable; also re-runs a done shard whose output went missing)")
    _broker_option(p)

    p = sub.add_parser("cancel", help="cancel a job: queued shards never start, running ones stop at the next batch")
    p.add_argument("job_id", metavar="JOB")
    _broker_option(p)

    p = sub.add_parser("delete", help="delete a job's state (and with --rows its Redis-sink rows)")
    p.add_argument("job_id", metavar="JOB")
    p.add_argument("--rows", action="store_true", help="also delete the rows the Redis sink wrote")
    _broker_option(p)

    p = sub.add_parser("collect", help="gather a job's rows into one file")
    p.add_argument("job_id", metavar="JOB")
    p.add_argument("--output", "-o", required=True, help="result file (local or s3://bucket/key)")
    p.add_argument("--format", choices=("parquet", "csv", "jsonl"), help="default: from the file extension")
    p.add_argument("--wait", action="store_true", help="wait for the job to finish, with a progress bar")
    p.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    p.add_argument("--allow-partial", action="store_true", help="write what is done; warn about the rest")
    _s3_option(p)
    _broker_option(p)

    p = sub.add_parser("report", help="one self-contained HTML page of a job: counts, timings, thumbnails, errors")
    p.add_argument("source", metavar="JOB|OUTPUT", help="a job id (its state from Redis, its rows from its output) "
                   "or an output file or folder (.parquet, .csv, .jsonl; local or s3://), e.g. what `run` wrote")
    p.add_argument("--output", "-o", required=True, help="the HTML file to write (local or s3://bucket/key)")
    p.add_argument("--samples", type=int, metavar="N", help="thumbnails of each of the largest classes (default 8)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    _s3_option(p)
    _broker_option(p)

    p = sub.add_parser("exporter", help="Prometheus metrics of jobs and queues from Redis (for dashboards and "
                       "autoscalers)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=9809, help="port (default 9809; 0 picks a free one)")
    _broker_option(p)
    return parser


def _check_common(args: argparse.Namespace) -> None:
    if getattr(args, "shard_size", 1) < 1:
        raise ConfigError("--shard-size must be at least 1")
    if (getattr(args, "ttl", None) or 0) < 0:
        raise ConfigError("--ttl must be 0 (never expire) or a number of seconds")
    if getattr(args, "interval", 1.0) <= 0:
        raise ConfigError("--interval must be a positive number of seconds")
    if getattr(args, "limit", 1) < 1:
        raise ConfigError("--limit must be at least 1")
    if getattr(args, "job_id", None) is not None:
        from producer.jobs import check_job_id

        check_job_id(args.job_id)
    if getattr(args, "timeout", None) is not None and args.timeout <= 0:
        raise ConfigError("--timeout must be a positive number of seconds")
    if args.command == "collect" and args.timeout is not None and not args.wait:
        raise ConfigError("--timeout applies to --wait")
    if args.command == "status" and args.interval != 1.0 and not args.watch:
        raise ConfigError("--interval applies to --watch")
    if args.command == "status" and args.limit != 50 and not args.shards:
        raise ConfigError("--limit applies to --shards")
    if getattr(args, "verbose", False):
        os.environ["BATCHINFER_VERBOSE"] = "1"
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    else:  # the worker modules' log lines repeat what the one error line says
        logging.getLogger("workers").addHandler(logging.NullHandler())
    endpoint = getattr(args, "s3_endpoint_url", None)
    if endpoint is not None:
        if not endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"--s3-endpoint-url must be an http:// or https:// URL, got {endpoint!r}")
        from workers.storage.s3 import ENDPOINT_ENV

        os.environ[ENDPOINT_ENV] = endpoint  # read by the S3 client of this process, when it is made


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
        _check_common(args)
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
