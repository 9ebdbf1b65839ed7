"""Check a run file against the machine-checkable format description (``run_format.json``).

Example:
    >>> report = validate_run("run.h5")  # doctest: +SKIP
    >>> report.ok, [str(f) for f in report.findings]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import ConfigError, RunFileError
from ..registry import ORIENTATIONS, OUT_IN, tall_shape
from . import format as fmt
from . import state as st
from .h5io import (
    DIGEST_ATTR,
    has_signature,
    metadata_digest,
    open_readonly,
    retrying,
    stored_digest,
)
from .reader import chunk_written, plain_value


@dataclass(frozen=True)
class Finding:
    level: str  # "error", "warning" or "info"
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.level.upper():7s} {self.where}: {self.message}"


@dataclass
class ValidationReport:
    path: Path
    findings: list[Finding] = field(default_factory=list)
    n_snapshots: int = 0

    @property
    def ok(self) -> bool:
        return not any(f.level == "error" for f in self.findings)

    def add(self, level: str, where: str, message: str) -> None:
        self.findings.append(Finding(level, where, message))


def _check_attr(
    report: ValidationReport, where: str, attrs: h5py.AttributeManager, key: str, rule: dict
) -> None:
    if key not in attrs:
        if rule.get("required"):
            report.add("error", where, f"missing attribute `{key}`")
        return
    value = plain_value(attrs[key])
    kind = rule["type"]
    if kind in ("str", "json") and not isinstance(value, str):
        report.add("error", where, f"attribute `{key}` should be a string, got {type(value)}")
        return
    if kind == "json":
        try:
            if not isinstance(json.loads(value), dict):
                report.add("error", where, f"attribute `{key}` is not a JSON object")
        except ValueError:
            report.add("error", where, f"attribute `{key}` is not valid JSON")
    if kind == "bool" and not isinstance(value, (bool, np.bool_)):
        report.add("error", where, f"attribute `{key}` should be a boolean, got {value!r}")
    if kind == "int_array" and not (
        isinstance(value, list) and all(isinstance(v, int) for v in value)
    ):
        report.add("error", where, f"attribute `{key}` should be an integer array, got {value!r}")
    if "equals" in rule and value != rule["equals"]:
        report.add("error", where, f"attribute `{key}` is {value!r}, expected {rule['equals']!r}")
    if "one_of" in rule and value not in rule["one_of"]:
        report.add(
            "error", where, f"attribute `{key}` is {value!r}, expected one of {rule['one_of']}"
        )
    if "pattern" in rule and isinstance(value, str) and not re.match(rule["pattern"], value):
        report.add(
            "error", where, f"attribute `{key}` = {value!r} does not match {rule['pattern']}"
        )


def _check_root(report: ValidationReport, f: h5py.File, spec: dict) -> None:
    for key, rule in spec["root_attributes"].items():
        _check_attr(report, "/", f.attrs, key, rule)
    version = plain_value(f.attrs.get("format_version", ""))
    try:
        major, minor = fmt.parse_version(version)
        ours = fmt.parse_version(spec["format_version"])
        if major != ours[0]:
            report.add(
                "error",
                "/",
                f"format version {version} has another major version than "
                f"this validator ({spec['format_version']})",
            )
        elif minor > ours[1]:
            report.add(
                "warning",
                "/",
                f"format version {version} is newer than this validator "
                f"({spec['format_version']}); unknown parts are ignored",
            )
    except ValueError:
        pass  # already reported by the pattern rule
    for group in spec["groups"]:
        if not isinstance(f.get(group), h5py.Group):
            report.add("error", f"/{group}", "missing group")


def _check_snapshots(report: ValidationReport, f: h5py.File, spec: dict) -> int:
    rule = spec["snapshots"]
    ds = f.get(rule["path"])
    if not isinstance(ds, h5py.Dataset):
        report.add("error", f"/{rule['path']}", "missing dataset")
        return 0
    names = ds.dtype.names or ()
    for name, dtype in rule["fields"].items():
        if name not in names:
            report.add("error", f"/{rule['path']}", f"missing field `{name}`")
        elif ds.dtype[name] != np.dtype(dtype):
            report.add(
                "error", f"/{rule['path']}", f"field `{name}` is {ds.dtype[name]}, expected {dtype}"
            )
    if ds.ndim != 1 or ds.maxshape != (None,):
        report.add("error", f"/{rule['path']}", f"should be extendable 1-D, is {ds.maxshape}")
        return 0
    n = len(ds)
    if n and "step" in names:
        steps = ds["step"]
        known = steps[steps >= 0]
        if np.any(np.diff(known) < 0):
            report.add("warning", "/snapshots", "steps are not non-decreasing")
    return n


def _check_metrics(report: ValidationReport, f: h5py.File, spec: dict, n: int) -> None:
    names = f.get(spec["metrics"]["names"]["path"])
    values = f.get(spec["metrics"]["values"]["path"])
    if not isinstance(names, h5py.Dataset) or not isinstance(values, h5py.Dataset):
        report.add("error", "/metrics", "missing names or values dataset")
        return
    if names.dtype.kind != "S" or names.ndim != 1:
        report.add("error", "/metrics/names", f"should be 1-D bytes, is {names.dtype}")
    if values.ndim != 2 or values.dtype != np.float64:
        report.add("error", "/metrics/values", f"should be 2-D float64, is {values.dtype}")
        return
    if values.shape[0] and values.shape[1] != len(names):
        report.add(
            "error",
            "/metrics/values",
            f"has {values.shape[1]} columns for {len(names)} metric names",
        )
    n_now = _live_count(f, n)
    if values.shape[0] > n_now + 1:
        report.add("error", "/metrics/values", f"has {values.shape[0]} rows for {n_now} snapshots")
    bad = [
        names[j].decode()
        for j in range(min(values.shape[1], len(names)))
        if np.isinf(values[:n, j]).any()
    ]
    if bad:
        report.add("warning", "/metrics", f"infinite values in {', '.join(bad)}")


def _check_events(report: ValidationReport, f: h5py.File, spec: dict) -> None:
    rule = spec["events"]
    ds = f.get(rule["path"])
    if ds is None:
        version = plain_value(f.attrs.get("format_version", "1.0"))
        if version != "1.0":
            report.add("error", "/events", f"missing (required since format {rule['since']})")
        return
    if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.dtype.kind != "S":
        report.add("error", "/events", "should be a 1-D bytes dataset of JSON objects")
        return
    for i, row in enumerate(ds[:]):
        try:
            if not isinstance(json.loads(row.decode()), dict):
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            report.add("error", "/events", f"row {i} is not a JSON object")
            return


def _check_layer(
    report: ValidationReport, name: str, ds: object, spec: dict, n: int, n_now: int
) -> None:
    where = f"/layers/{name}"
    rule = spec["layer"]
    if isinstance(ds, h5py.Group):
        report.add(
            "error",
            where,
            "is a group, not a dataset (a '/' in a layer name, written before format 1.2?)",
        )
        return
    if not isinstance(ds, h5py.Dataset):
        report.add("error", where, "is not a dataset")
        return
    if ds.ndim != rule["ndim"]:
        report.add("error", where, f"should be (T, m, n), has shape {ds.shape}")
        return
    for key, attr_rule in rule["attributes"].items():
        _check_attr(report, where, ds.attrs, key, attr_rule)
    storage = plain_value(ds.attrs.get("storage_dtype", ""))
    if storage in rule["dtypes"] and ds.dtype != np.dtype(rule["dtypes"][storage]):
        report.add("error", where, f"dtype {ds.dtype} does not store {storage}")
    m, k = ds.shape[1:]
    if m == 0 or k == 0:
        report.add("error", where, f"matrix {m}x{k} is empty")
        return
    if m < k:
        report.add("error", where, f"matrix {m}x{k} is not tall (rows >= columns)")
    if ds.chunks != (1, m, k):
        report.add("warning", where, f"chunks {ds.chunks}, expected one snapshot per chunk")
    if ds.maxshape[0] is not None:
        report.add("error", where, "is not extendable along snapshots")
    orientation = plain_value(ds.attrs.get("orientation", OUT_IN))
    if "orig_shape" in ds.attrs and "transposed" in ds.attrs and orientation in ORIENTATIONS:
        try:
            shape, transposed = tall_shape([int(d) for d in ds.attrs["orig_shape"]], orientation)
        except ConfigError:  # an (in, out) orientation on a weight that is not 2-D
            shape, transposed = None, None
        if shape != (m, k) or transposed != bool(ds.attrs["transposed"]):
            report.add(
                "error",
                where,
                f"orig_shape {tuple(ds.attrs['orig_shape'])} does not "
                f"give the stored {m}x{k} matrix",
            )
    rows = ds.shape[0]
    if rows < n:
        report.add("error", where, f"has {rows} snapshots but /snapshots commits {n}")
    elif rows == n + 1:
        report.add("info", where, "holds a half-written last snapshot that readers ignore")
    elif rows > n_now + 1:  # n_now: the count after this layer was opened (a live writer)
        report.add("error", where, f"has {rows} rows for {n_now} committed snapshots")
    _check_finite(report, where, ds, storage, min(rows, n))


def _check_finite(
    report: ValidationReport, where: str, ds: h5py.Dataset, storage: str, n: int, decode=None
) -> None:
    """Read every committed row (which verifies its checksum); warn of NaN/Inf values."""
    bad = []
    for t in range(n):
        if not chunk_written(ds, t):
            report.add("error", where, f"snapshot {t} has no data in the file (never written)")
            continue
        try:
            raw = ds[t]  # reading a row verifies its checksum
        except (OSError, RuntimeError) as exc:
            report.add("error", where, f"snapshot {t} cannot be read ({_reason(exc)})")
            continue
        if decode is not None:
            mat = decode(raw)
        else:
            mat = fmt.decode(raw, storage) if storage in fmt.STORAGE_DTYPES else raw
        if mat.dtype.kind == "f" and not np.isfinite(mat).all():
            bad.append(t)
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        report.add("warning", where, f"NaN/Inf values in {len(bad)} snapshot(s): {shown}")


def _reason(exc: BaseException) -> str:
    text = str(exc).split("\n")[0][:160]
    if "checksum" in text.lower() or "filter" in text.lower():
        return f"it fails its checksum: {text}"
    return text


def _check_checksums(report: ValidationReport, f: h5py.File) -> None:
    """Since format 1.2 every dataset carries fletcher32; older files cannot detect damage."""
    version = str(plain_value(f.attrs.get("format_version", "")))
    # the format's own datasets only: HDF5's visititems crashed on a damaged file's links
    names = ["snapshots", "events", "metrics/names", "metrics/values"]
    for group_name in ("layers", st.GROUP):
        group = f.get(group_name)
        if isinstance(group, h5py.Group):
            names += [
                f"{group_name}/{k}"
                for k in group
                if isinstance(group.get(k, getlink=True), h5py.HardLink)
            ]
    unchecked = [
        name for name in names if isinstance(f.get(name), h5py.Dataset) and not f[name].fletcher32
    ]
    if not fmt.at_least(version, fmt.CHECKSUMS_SINCE):
        report.add(
            "warning",
            "/",
            f"format {version} predates checksums (1.2): damaged data cannot be detected",
        )
    elif stored_digest(f) is None:
        report.add("error", "/layers", f"missing attribute `{DIGEST_ATTR}` (required since 1.2)")
    elif stored_digest(f) != metadata_digest(f):
        report.add("error", "/", f"names or attributes fail their checksum `{DIGEST_ATTR}`")
    if fmt.at_least(version, fmt.CHECKSUMS_SINCE) and unchecked:
        shown = ", ".join(unchecked[:5]) + (" ..." if len(unchecked) > 5 else "")
        report.add("error", "/", f"dataset(s) without their fletcher32 checksum: {shown}")


def _live_count(f: h5py.File, n: int) -> int:
    """The committed count now: a live writer may have committed more since ``n`` was read, so a
    dataset opened after that may hold up to this count + 1 rows."""
    if not f.swmr_mode:
        return n
    f["snapshots"].refresh()
    return len(f["snapshots"])


def _check_layers(report: ValidationReport, f: h5py.File, spec: dict, n: int) -> None:
    layers = f.get("layers")
    if not isinstance(layers, h5py.Group):
        return  # reported by _check_root
    if not len(layers):
        report.add("error", "/layers", "holds no layer")
    found: list[tuple[str, object]] = []
    seen: dict[int, str] = {}
    for name in layers:
        link = layers.get(name, getlink=True)
        if not isinstance(link, h5py.HardLink):
            report.add("error", f"/layers/{name}", f"is a {type(link).__name__}, not a dataset")
            continue
        obj = layers.get(name)
        if hash(obj.id) in seen:
            report.add(
                "error", f"/layers/{name}", f"is a second name for /layers/{seen[hash(obj.id)]}"
            )
            continue
        seen[hash(obj.id)] = name
        found.append((name, obj))
    declared = sum(
        obj.dtype.itemsize * int(np.prod(obj.shape[1:])) * n
        for _, obj in found
        if isinstance(obj, h5py.Dataset) and obj.ndim == 3
    )
    size = os.path.getsize(f.filename)
    if declared > size:
        report.add(
            "error",
            "/layers",
            f"declares {declared:,} bytes of committed snapshots in a {size:,}-byte file",
        )
        return
    for name, obj in found:
        _check_layer(report, name, obj, spec, n, _live_count(f, n))


def _check_state(report: ValidationReport, f: h5py.File, spec: dict, n: int) -> None:
    """``/state`` (format 1.3, optional): its index, and each dtype's rows like a layer's."""
    group = f.get(spec["state"]["path"])
    if group is None:
        return
    try:
        index_ds = st.index_dataset(group)
    except ValueError as exc:
        report.add("error", "/state", str(exc))
        return
    try:
        raw = index_ds[:]
        index = st.StateIndex.from_json(raw.tobytes())
    except (OSError, RuntimeError) as exc:
        report.add("error", "/state/index", f"cannot be read ({_reason(exc)})")
        return
    except ValueError as exc:
        report.add("error", "/state/index", str(exc))
        return
    layout = index.layout()
    known = {st.INDEX, *(dtype for dtype, _, _ in layout)}
    for name in group:
        if name not in known:
            report.add("warning", f"/state/{name}", "is not in the state index; readers ignore it")
    size = os.path.getsize(f.filename)
    declared = sum(width * st.h5_dtype(dtype).itemsize for dtype, _, width in layout) * n
    if declared > size:
        report.add(
            "error",
            "/state",
            f"declares {declared:,} bytes of committed snapshots in a {size:,}-byte file",
        )
        return
    for dtype, _, width in layout:
        _check_state_values(report, group, spec, dtype, width, n, _live_count(f, n))


def _check_state_values(
    report: ValidationReport,
    group: h5py.Group,
    spec: dict,
    dtype: str,
    width: int,
    n: int,
    n_now: int,
) -> None:
    where = f"/state/{dtype}"
    if not isinstance(group.get(dtype, getlink=True), h5py.HardLink):
        report.add("error", where, "is missing (the state index lists entries of this dtype)")
        return
    ds = group.get(dtype)
    if not isinstance(ds, h5py.Dataset) or ds.ndim != spec["state"]["values"]["ndim"]:
        report.add("error", where, "should be a (T, N) dataset of packed state rows")
        return
    for key, rule in spec["state"]["values"]["attributes"].items():
        _check_attr(report, where, ds.attrs, key, rule)
    if plain_value(ds.attrs.get("dtype", dtype)) != dtype:
        report.add("error", where, f"attribute `dtype` is {plain_value(ds.attrs['dtype'])!r}")
    if ds.dtype != st.h5_dtype(dtype) or ds.shape[1] != width:
        report.add(
            "error",
            where,
            f"holds {ds.dtype} rows of {ds.shape[1]} values; the index says "
            f"{st.h5_dtype(dtype)} rows of {width}",
        )
        return
    if ds.chunks != (1, width):
        report.add("warning", where, f"chunks {ds.chunks}, expected one snapshot per chunk")
    if ds.maxshape[0] is not None:
        report.add("error", where, "is not extendable along snapshots")
    rows = ds.shape[0]
    if rows < n:
        report.add("error", where, f"has {rows} snapshots but /snapshots commits {n}")
    elif rows == n + 1:
        report.add("info", where, "holds a half-written last snapshot that readers ignore")
    elif rows > n_now + 1:
        report.add("error", where, f"has {rows} rows for {n_now} committed snapshots")
    _check_finite(report, where, ds, dtype, min(rows, n), lambda raw: st.decode(raw, dtype))


def validate_run(path: str | os.PathLike) -> ValidationReport:
    """Check ``path`` against the format description; never raises for a bad file.

    Every committed row of every dataset is read, which verifies its checksum (format 1.2).

    Returns:
        A :class:`ValidationReport`; ``report.ok`` is False when any finding is an error.
    """
    path = Path(path)
    report = ValidationReport(path)
    spec = fmt.format_description()
    if path.is_dir():
        report.add("error", str(path), "is a directory; pass a run file (RUN.h5)")
        return report
    if not path.is_file():
        report.add("error", str(path), "no such file")
        return report
    if not has_signature(path) and not h5py.is_hdf5(path):
        report.add("error", str(path), "not an HDF5 file")
        return report
    try:
        f = open_readonly(path)
    except RunFileError as exc:
        report.add("error", str(path), str(exc))
        return report
    with f:
        try:
            _validate_open(report, f, spec)
        except (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
            report.add("error", str(path), f"cannot be read further ({_reason(exc)})")
    return report


def _attempt(report: ValidationReport, f: h5py.File, check, where: str | None = None):
    """Run one table check; on a live file, retry it (dropping that try's findings) while a
    chunk fails its checksum, as a writer rewriting it in place makes it do once."""
    before = len(report.findings)

    def once():
        del report.findings[before:]
        return check()

    try:
        return retrying(once, live=f.swmr_mode)
    except (OSError, RuntimeError) as exc:
        if where is None:
            raise
        report.add("error", where, f"cannot be read ({_reason(exc)})")
        return None


def _validate_open(report: ValidationReport, f: h5py.File, spec: dict) -> None:
    _check_root(report, f, spec)
    if not report.ok and "format" not in f.attrs:
        return
    n = report.n_snapshots = _attempt(report, f, lambda: _check_snapshots(report, f, spec))
    _attempt(report, f, lambda: _check_metrics(report, f, spec, n), "/metrics")
    _attempt(report, f, lambda: _check_events(report, f, spec), "/events")
    _check_checksums(report, f)
    _check_layers(report, f, spec, n)
    _check_state(report, f, spec, n)
