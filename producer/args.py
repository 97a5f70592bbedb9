"""The ``batchinfer`` argument parser: every command's flags, and the checks of them that need no server.

Imports nothing heavy (no Keras, Redis or boto3): ``--help`` and a mistyped flag answer at once.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import NoReturn

from producer.config import add_model_options
from workers import __version__
from workers.contract import SINKS
from workers.errors import ConfigError
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


def check_args(args: argparse.Namespace) -> None:
    """The checks argparse cannot make (ranges, flags that go together); sets up logging and the S3 endpoint."""
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
        from workers.storage.s3_client import ENDPOINT_ENV

        os.environ[ENDPOINT_ENV] = endpoint  # read by the S3 client of this process, when it is made
