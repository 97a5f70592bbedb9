"""``--keep-columns``: columns of CSV/Parquet manifests copied into every output row, checked before any work.

Users join the output with their own data on their own keys (an id, a caption) instead of the URI. Every
source must be a CSV or Parquet manifest with every named column; a name the output already uses is
refused. Each column gets one Arrow type for the whole job, recorded in ``OutputSpec.keep_columns`` so
that every shard's schema is the same: a Parquet manifest's own type (integers, floating point, booleans,
strings), ``string`` for CSV. Where manifests disagree, integers of different widths become ``int64``,
integers and floats ``double``, anything else ``string`` (the producer casts the values, with Arrow).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from producer.manifests import manifest_columns, manifest_name
from producer.sources import source_kind
from workers.contract import ModelSpec
from workers.errors import ConfigError

REDIS_FIELDS = ("shard",)  # what the Redis sink adds to each row's hash
KINDS = {"folder": "a folder", "prefix": "a folder (S3 prefix)", "image": "an image"}


def parse_names(text: str) -> tuple[str, ...]:
    """``"id, caption"`` -> ``("id", "caption")``; empty or repeated names are a ``ConfigError``."""
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise ConfigError(f"--keep-columns {text!r}: give column names separated by commas (id,caption)")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"--keep-columns: {repeated[0]!r} is named twice")
    return names


def output_columns(model: ModelSpec) -> list[str]:
    """The columns the job's rows have without kept ones (``workers.schema``), and the Redis sink's own field."""
    from workers.schema import output_schema

    features = {name: 1 for name in model.feature_columns()}
    return [*output_schema(model.task, model.top_k, feature_columns=features).names, *REDIS_FIELDS]


def kept_columns(sources: Sequence[str], names: Sequence[str], model: ModelSpec) -> tuple[tuple[str, str], ...]:
    """``(name, Arrow type)`` of each kept column, for ``OutputSpec.keep_columns``; see the module docstring.

    Reads each manifest's header (CSV) or footer (Parquet) only; raises ``ConfigError`` with one line
    naming the column, the source and the columns it has.
    """
    if not names:
        return ()
    taken = output_columns(model)
    for name in names:
        if name in taken:
            raise ConfigError(f"--keep-columns {name}: the output already has a column {name!r} "
                              f"({', '.join(taken)}); rename it in the manifest")
    found: dict[str, list[Any]] = {name: [] for name in names}
    for source in sources:
        kind, path = source_kind(source)
        if kind != "manifest" or not manifest_name(path).lower().endswith((".csv", ".parquet")):
            what = KINDS.get(kind, "a .txt manifest")
            raise ConfigError(f"--keep-columns needs CSV or Parquet manifests with those columns: {source} is {what}")
        columns = manifest_columns(path)
        for name in names:
            if name not in columns:
                raise ConfigError(f"--keep-columns {name}: {source} has no column {name!r} "
                                  f"(its columns: {', '.join(columns)})")
            found[name].append(_supported(columns[name], name, source))
    return tuple((name, str(_common(found[name]))) for name in names)


def _supported(type_: Any, name: str, source: str) -> Any:
    """The type a kept column travels as (JSON values, one Arrow type), or a ``ConfigError``."""
    import pyarrow as pa

    if pa.types.is_dictionary(type_):
        type_ = type_.value_type
    if pa.types.is_string(type_) or pa.types.is_large_string(type_):
        return pa.string()
    if pa.types.is_float16(type_):
        return pa.float32()
    if pa.types.is_integer(type_) or pa.types.is_floating(type_) or pa.types.is_boolean(type_):
        return type_
    raise ConfigError(f"--keep-columns {name}: {source} has it as {type_}; kept columns can be strings, "
                      "integers, floating point or booleans (cast it in the manifest)")


def _common(types: list[Any]) -> Any:
    import pyarrow as pa

    if all(t == types[0] for t in types):
        return types[0]
    if all(pa.types.is_integer(t) for t in types):
        return pa.int64()
    if all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in types):
        return pa.float64()
    return pa.string()
