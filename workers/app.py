"""The Celery app: JSON-only (or signed) messages, late acks, one task at a time per process.

Every setting can be overridden from the environment: ``BATCHINFER_CELERY_<SETTING>`` (value parsed
as JSON when it parses, e.g. ``BATCHINFER_CELERY_WORKER_CONCURRENCY=2``), besides the
``BATCHINFER_*`` variables of ``workers.settings``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from celery import Celery
from celery.signals import after_setup_logger, after_setup_task_logger, worker_init, worker_ready, worker_shutting_down

from workers.contract import TASK_NAME
from workers.errors import ConfigError
from workers.recovery import recovery_step
from workers.settings import Settings

ENV_PREFIX = "BATCHINFER_CELERY_"


def celery_config(settings: Settings, env: dict[str, str] | None = None) -> dict[str, object]:
    env = dict(os.environ if env is None else env)
    config: dict[str, object] = {
        "broker_url": settings.broker_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "task_acks_late": True,  # a shard is acknowledged only after its output is committed
        "task_reject_on_worker_lost": True,  # a killed pool child's shard goes back to the queue at once
        # a shard running past the limit is failed like a crash (soft: an exception; hard: the child is killed)
        "task_soft_time_limit": settings.shard_time_limit,
        "task_time_limit": settings.shard_time_limit + 60,
        "worker_prefetch_multiplier": 1,  # never hold shards another idle worker could run
        "worker_concurrency": 1,  # one process per GPU; TensorFlow already uses every CPU core
        "worker_proc_alive_timeout": 300,  # a pool process imports TensorFlow before it says it is up
        "task_ignore_result": True,  # progress lives in the job state, not in a result backend
        "task_default_queue": settings.queue,
        "task_routes": {TASK_NAME: {"queue": settings.queue}},
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout, **broker_namespace(settings)},
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": True,  # Flower shows running shards
    }
    if settings.broker_url.startswith("rediss://"):  # TLS: the CA, client certificate and checks (workers.redis_conn)
        config["broker_use_ssl"] = settings.redis_tls.celery()
    if settings.signing.on:  # signed task and remote-control messages (workers.signing)
        config.update(settings.signing.celery())
    for name, raw in env.items():
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            try:
                value: object = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            config[name[len(ENV_PREFIX):].lower()] = value
    if settings.signing.on:
        settings.signing.check(config)
    return config


def _configuration() -> dict[str, object]:
    """The app's configuration, read from the environment when first used. With signing on, the ``auth``
    serializer is installed here, before any message can be sent or read: the worker's pool, its recovery
    loop, a submit, Flower and ``celery inspect`` all read the configuration first."""
    settings = Settings.from_env()
    config = celery_config(settings)
    if settings.signing.on:
        settings.signing.install()
    return config


def broker_namespace(settings: Settings) -> dict[str, object]:
    """With ``BATCHINFER_NAMESPACE`` set, the broker's keys and channels under ``{namespace}:broker:`` (kombu's
    ``global_keyprefix``), so that ``infra/redis/users.acl.in`` can confine each deployment's users to them."""
    return {"global_keyprefix": settings.broker_prefix} if settings.broker_prefix else {}


app = Celery("batchinfer", include=["workers.tasks"])
# A promise, read when the configuration is first used (a worker starting, a submit): importing the
# package never reads the environment, so a bad variable is the command line's one-line error.
app.add_defaults(_configuration)
app.steps["worker"].add(recovery_step())


@worker_init.connect
def _check_backend(**_: Any) -> None:
    """A worker whose ``KERAS_BACKEND`` is unsupported or not installed exits at once, in one line, rather
    than fail every shard it takes (Celery logs and ignores what a signal handler raises, but not an exit)."""
    from workers.models.backends import check

    try:
        check()
    except ConfigError as exc:
        raise SystemExit(f"batchinfer worker: error: {exc}") from None


@worker_init.connect
def _serve_metrics(**_: Any) -> None:
    """``BATCHINFER_METRICS_PORT``: the main process serves ``/metrics``, ``/healthz`` and ``/readyz`` before the
    pool forks (``workers.metrics.worker``); a port that cannot be had is one line and an exit."""
    from workers.metrics.worker import serve_worker_metrics

    try:
        serve_worker_metrics(Settings.from_env())
    except ConfigError as exc:
        raise SystemExit(f"batchinfer worker: error: {exc}") from None


@worker_ready.connect
def _ready(**_: Any) -> None:
    from workers.metrics.worker import HEALTH

    HEALTH.ready = True


@worker_shutting_down.connect
def _not_ready(**_: Any) -> None:
    from workers.metrics.worker import HEALTH

    HEALTH.ready = False


@after_setup_logger.connect
@after_setup_task_logger.connect
def _redact_logs(logger: Any = None, **_: Any) -> None:
    """No password reaches a worker's log: every URL in a record is redacted (Celery masks its own banner's)."""
    from workers.settings import RedactSecrets

    for handler in getattr(logger, "handlers", []):
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())
