"""WebDataset shards: write any iterable of samples into tar shards, and expand a shard spec into a list.

A shard is a plain POSIX tar file whose members are ``{key}.json`` (one JSON object per sample), the layout
``webdataset`` reads. Writing needs no third-party package; reading lives in :mod:`dllm_zoo.data.stream`.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

_REMOTE = re.compile(r"^(pipe:|[a-zA-Z][a-zA-Z0-9+.-]*://)")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_GLOB_CHARS = set("*?[")


def write_shards(
    samples: Iterable[Mapping[str, Any]],
    out_dir: str | Path,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
    overwrite: bool = False,
) -> list[Path]:
    """Write samples into WebDataset tar shards ``{prefix}-{i:06d}.tar``.

    Each sample becomes one member ``{key}.json`` whose key is its running index over the whole iterable
    (``000000000``, ``000000001``, …), so keys are stable and unique across shards. Fields whose names start
    with ``__`` (``__key__``, ``__url__`` left over from a read) are not written. Every shard is written to a
    temporary file in ``out_dir`` and moved into place with ``os.replace``: a crash never leaves a truncated
    shard under a final name. The tar members are written with fixed metadata (mtime 0, uid 0), so the same
    samples always give byte-identical shards.

    Args:
        samples: JSON-serialisable dicts.
        out_dir: Directory for the shards (created if missing).
        prefix: File name prefix.
        samples_per_shard: Samples per shard (the last shard may hold fewer).
        overwrite: Replace existing ``{prefix}-*.tar`` files in ``out_dir`` (stale ones beyond the new count are
            removed). Without it, existing shards with the prefix raise ``FileExistsError``.

    Returns:
        The written shard paths, in order (empty for an empty iterable).

    Raises:
        ValueError: if ``samples_per_shard < 1`` or ``prefix`` is empty or contains a path separator.
        FileExistsError: if shards with ``prefix`` already exist and ``overwrite`` is false.
        TypeError: if a sample is not a mapping or not JSON-serialisable.

    Example:
        >>> import tempfile
        >>> paths = write_shards(({"text": str(i)} for i in range(5)), tempfile.mkdtemp(), samples_per_shard=2)
        >>> [p.name for p in paths]
        ['shard-000000.tar', 'shard-000001.tar', 'shard-000002.tar']
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not prefix or "/" in prefix or os.sep in prefix:
        raise ValueError(f"prefix must be a plain file name prefix, got {prefix!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob(f"{glob.escape(prefix)}-*.tar"))
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds {len(existing)} shard(s) named {prefix}-*.tar; pass overwrite=True or choose "
            "another out_dir/prefix"
        )
    written: list[Path] = []
    batch: list[tuple[str, bytes]] = []
    for index, sample in enumerate(samples):
        batch.append((f"{index:09d}", _encode(sample, index)))
        if len(batch) == samples_per_shard:
            written.append(_write_tar(out / f"{prefix}-{len(written):06d}.tar", batch))
            batch = []
    if batch:
        written.append(_write_tar(out / f"{prefix}-{len(written):06d}.tar", batch))
    keep = set(written)
    for stale in existing:
        if stale not in keep:
            stale.unlink()
    return written


def _encode(sample: Mapping[str, Any], index: int) -> bytes:
    if not isinstance(sample, Mapping):
        raise TypeError(f"sample {index} is a {type(sample).__name__}, expected a dict")
    clean = {k: v for k, v in sample.items() if not str(k).startswith("__")}
    try:
        return json.dumps(clean, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as exn:
        raise TypeError(f"sample {index} is not JSON-serialisable: {exn}") from exn


def _write_tar(path: Path, members: Sequence[tuple[str, bytes]]) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, data in members:
                info = tarfile.TarInfo(f"{key}.json")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------------------------- specs
def is_remote(spec: str) -> bool:
    """Whether ``spec`` is a URL or a ``pipe:`` command (``https://``, ``s3://``, ``gs://``, ``pipe:…``).

    ``file://`` URLs are local.
    """
    return bool(_REMOTE.match(spec)) and not spec.startswith("file://")


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces: numeric ranges ``{000..009}`` (zero padding kept) and lists ``{a,b}``.

    Args:
        pattern: A string with zero or more brace groups (not nested).

    Returns:
        Every expansion, in order (the pattern itself when it has no braces).

    Example:
        >>> expand_braces("s-{08..10}.tar")
        ['s-08.tar', 's-09.tar', 's-10.tar']
        >>> expand_braces("{a,b}{1..2}")
        ['a1', 'a2', 'b1', 'b2']
    """
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    rng = _RANGE.match(body)
    if rng is not None:
        lo_s, hi_s = rng.groups()
        lo, hi = int(lo_s), int(hi_s)
        width = len(lo_s) if lo_s.lstrip("-").startswith("0") and len(lo_s) > 1 else 0
        step = 1 if hi >= lo else -1
        choices = [f"{i:0{width}d}" for i in range(lo, hi + step, step)]
    else:
        choices = body.split(",")
    return [head + choice + rest for choice in choices for rest in expand_braces(tail)]


def expand_shards(spec: str | Path | Sequence[str | Path], flag: str = "--data.train") -> list[str]:
    """Expand a shard spec into a list of shard paths or URLs.

    Accepted forms (a list of them is expanded item by item and concatenated):

    * a brace pattern ``data/shard-{000000..000009}.tar`` (every expansion must exist),
    * a glob ``data/*.tar`` (sorted),
    * a single file, or a ``file://`` URL,
    * a directory: every ``*.tar`` directly inside it, sorted,
    * a remote spec (``https://…``, ``s3://…``, ``gs://…``, ``pipe:…``): brace-expanded and passed on
      untouched, without any existence check.

    Args:
        spec: The spec.
        flag: The command-line flag that set ``spec``; named in error messages.

    Returns:
        Local paths (as strings) and URLs, in order.

    Raises:
        FileNotFoundError: if a local spec matches no file; the message names ``flag``.
    """
    if isinstance(spec, (list, tuple)):
        out: list[str] = []
        for item in spec:
            out.extend(expand_shards(item, flag))
        if not out:
            raise FileNotFoundError(f"{flag} is an empty list of shards; set {flag} to at least one shard")
        return out
    text = str(spec)
    if is_remote(text):
        return expand_braces(text)
    if text.startswith("file://"):
        text = text[len("file://") :]
    found: list[str] = []
    missing: list[str] = []
    for item in expand_braces(os.path.expanduser(text)):
        if _GLOB_CHARS & set(item):
            hits = sorted(glob.glob(item))
            found.extend(hits)
            if not hits:
                missing.append(item)
        elif os.path.isdir(item):
            hits = sorted(str(p) for p in Path(item).glob("*.tar"))
            found.extend(hits)
            if not hits:
                missing.append(f"{item}/*.tar")
        elif os.path.isfile(item):
            found.append(item)
        else:
            missing.append(item)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(
            f"{flag}={text!r}: no shard at {shown}. Set {flag} to a .tar shard, a brace pattern such as "
            "'data/shard-{000000..000009}.tar', a glob, a directory of .tar shards, a URL / 'pipe:' command, "
            "or a datasets.save_to_disk directory"
        )
    return found
