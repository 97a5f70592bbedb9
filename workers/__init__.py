"""Celery workers for batch inference: ``celery -A workers worker``.

Importing this package is cheap: it builds no Celery app and never imports TensorFlow, so the shard
pipeline (``workers.pipeline``) runs where Celery is not installed (``batchinfer run``, the benchmark on
a GPU machine). The app lives in ``workers.app``; ``celery -A workers`` finds it through
``workers.celery``. The model is built inside each worker process on its first shard.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
