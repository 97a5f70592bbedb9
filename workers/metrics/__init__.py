"""Prometheus metrics of the workers (``worker``), the HTTP endpoint that serves them with probes (``http``) and
the accelerator's memory (``device``); ``batchinfer exporter`` (``producer.exporter``) serves the jobs' side."""
