"""Tuned kernel configurations on disk, keyed by device kind, op and problem.

A cache file is JSON::

    {"format": 1,
     "entries": {"<device kind>": {"<op>": {"<problem key>": {
         "config": {"type": "pallas_kernels.gated:TileConfig", "fields": {...}},
         "ms": 0.123, "heuristic_ms": 0.150, "objective": "forward+backward",
         "jax": "0.11.2", "date": "2026-12-02"}}}}}

The device kind is ``jax.Device.device_kind`` ("NVIDIA H200", "cpu", ...); the problem
key is :func:`problem_key` of the facts the op's implementation names (shapes, dtype,
options). A config is a frozen dataclass of ``pallas_kernels``, nested ones included
(``ChunkScanConfig`` holds two).

:func:`lookup` reads the user's cache first (``$BJAX_TUNING_CACHE``, else
``~/.cache/bjax/tuning.json``), then the entries that ship with bjax (``shipped/*.json``
next to this module). An entry matches one exact problem; other problems keep the
heuristic.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib
import json
import os
import pathlib
from typing import Any

import jax

from bjax.errors import TuningCacheError

FORMAT = 1
CACHE_ENV_VAR = "BJAX_TUNING_CACHE"
SHIPPED = pathlib.Path(__file__).parent / "shipped"
_CONFIG_MODULES = "pallas_kernels."


def user_cache_path() -> pathlib.Path:
    """``$BJAX_TUNING_CACHE``, else ``~/.cache/bjax/tuning.json`` (it need not exist)."""
    path = os.environ.get(CACHE_ENV_VAR)
    return pathlib.Path(path) if path else pathlib.Path.home() / ".cache" / "bjax" / "tuning.json"


def device_kind() -> str:
    """The kind of JAX's default device: what cache entries are keyed by."""
    return jax.devices()[0].device_kind


def problem_key(**facts: Any) -> str:
    """``"name=value,..."`` in name order: the key of one problem (values as ``str``)."""
    return ",".join(f"{name}={facts[name]}" for name in sorted(facts))


def config_to_json(config: Any) -> dict:
    """A ``pallas_kernels`` config dataclass as JSON (nested configs too)."""
    cls = type(config)
    if not dataclasses.is_dataclass(config) or not cls.__module__.startswith(_CONFIG_MODULES):
        raise TypeError(f"not a pallas_kernels config: {config!r}")
    fields = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        fields[field.name] = config_to_json(value) if dataclasses.is_dataclass(value) else value
    return {"type": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}


def config_from_json(data: dict) -> Any:
    """The inverse of :func:`config_to_json`.

    Raises:
      TuningCacheError: a type outside ``pallas_kernels``, or fields it does not have.
    """
    module, _, name = data["type"].partition(":")
    if not module.startswith(_CONFIG_MODULES):
        raise TuningCacheError(f"config type {data['type']!r} is not in pallas_kernels")
    cls = getattr(importlib.import_module(module), name)
    fields = {key: config_from_json(value) if isinstance(value, dict) else value
              for key, value in data["fields"].items()}
    try:
        return cls(**fields)
    except TypeError as error:
        raise TuningCacheError(f"config {data['type']!r} with fields {sorted(fields)}: "
                               f"{error}") from None


@functools.lru_cache(maxsize=16)
def _read(path: str, mtime_ns: int) -> dict:
    del mtime_ns   # part of the cache key: a rewritten file is read again
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as error:
            raise TuningCacheError(f"{path}: not a tuning cache ({error})") from None
    if data.get("format") != FORMAT:
        raise TuningCacheError(f"{path}: tuning cache format {data.get('format')!r}, "
                               f"expected {FORMAT}")
    return data["entries"]


def _entries(path: pathlib.Path) -> dict:
    try:
        return _read(str(path), path.stat().st_mtime_ns)
    except FileNotFoundError:
        return {}


def _files() -> list[pathlib.Path]:
    return [user_cache_path(), *sorted(SHIPPED.glob("*.json"))]


def entries(device: str | None = None) -> list[tuple[pathlib.Path, str, str, dict]]:
    """Every entry for ``device`` (default: this process's kind), as ``(file, op, key,
    entry)`` in lookup order (the user's cache first, then the shipped files)."""
    device = device_kind() if device is None else device
    return [(path, op, key, entry) for path in _files()
            for op, by_key in sorted(_entries(path).get(device, {}).items())
            for key, entry in sorted(by_key.items())]


def lookup(op: str, key: str, device: str | None = None) -> Any | None:
    """The tuned config of ``op`` for problem ``key`` on ``device`` (default: this
    process's :func:`device_kind`), from the first file that has one; else ``None``.

    Raises:
      TuningCacheError: a cache file that cannot be read (not JSON, another format), or
        an entry naming a config outside ``pallas_kernels``.
    """
    device = device_kind() if device is None else device
    for path in _files():
        entry = _entries(path).get(device, {}).get(op, {}).get(key)
        if entry is not None:
            return config_from_json(entry["config"])
    return None


def record(op: str, key: str, config: Any, *, path: pathlib.Path | None = None,
           device: str | None = None, **measured: Any) -> pathlib.Path:
    """Writes (or replaces) the entry of ``op`` / ``key`` / ``device`` in the cache file
    ``path`` (default :func:`user_cache_path`), with ``measured`` facts beside the config
    (times, objective); returns the path."""
    path = user_cache_path() if path is None else pathlib.Path(path)
    device = device_kind() if device is None else device
    entries = json.loads(json.dumps(_entries(path)))   # a copy: _read's result is shared
    entry = {"config": config_to_json(config), **measured,
             "jax": jax.__version__, "date": datetime.date.today().isoformat()}
    entries.setdefault(device, {}).setdefault(op, {})[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "entries": entries}, indent=1, sort_keys=True)
                   + "\n")
    tmp.replace(path)
    return path
