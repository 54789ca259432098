"""Family-agnostic safetensors checkpoints in the Hugging Face file layout.

A checkpoint directory holds ``config.json`` and either one ``model.safetensors`` or shards
``model-00001-of-0000N.safetensors`` listed by ``model.safetensors.index.json``
(``{"metadata": {"total_size": bytes}, "weight_map": {key: shard file}}``), exactly as ``transformers`` writes them,
so the original LLaDA/MMaDA/SDAR checkpoints load unchanged and ours load in their code.

Loading is strict: the key set and every shape are checked against the model *before* any tensor data is read,
and one ``ValueError`` lists every missing, unexpected and mis-shaped key together with the file. A corrupt or
truncated file raises naming that file.

Writing is atomic per file (write ``.<name>.tmp``, then rename) and ordered so that an interrupted save never
leaves a directory that silently loads a mix of old and new weights: the old index is removed first, data files
are renamed into place, and the new index (the commit point of a sharded checkpoint) comes last; stale files of
the previous layout are removed at the end.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
DEFAULT_MAX_SHARD_SIZE = 5 * 2**30


# ----------------------------------------------------------------------------------------------- json helpers
def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON object from ``path``.

    Raises:
        FileNotFoundError: naming ``path`` when it does not exist.
        ValueError: naming ``path`` when it is not valid JSON or not an object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def write_json_atomic(obj: Mapping[str, Any], path: str | Path) -> None:
    """Write ``obj`` as indented JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = _tmp_name(path)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


# ---------------------------------------------------------------------------------------------------- reading
def checkpoint_files(
    path: str | Path,
    *,
    weights_names: Sequence[str] = (WEIGHTS_NAME,),
    index_name: str | None = INDEX_NAME,
) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint directory.

    Args:
        path: Checkpoint directory.
        weights_names: Single-file names to look for, in order of preference (the first one present is used);
            default ``model.safetensors``. Other layouts (e.g. diffusers' ``diffusion_pytorch_model.safetensors``)
            pass their own.
        index_name: Shard index file name, or ``None`` to accept single files only (a stray index of another
            model in the same directory is then ignored).

    Returns:
        ``(files, weight_map)``: the data files, and the index's key -> file name map (``None`` for a single
        file). The index wins when both exist (see the module docstring for why).

    Raises:
        FileNotFoundError: naming the directory, the index or the missing shard; when nothing is found, the
            message lists every name tried.
        ValueError: naming the index when it is malformed.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} not found")
    index = root / index_name if index_name is not None else None
    if index is not None and index.is_file():
        data = read_json(index)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index} has no valid 'weight_map' (key -> shard file name)")
        files = [root / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"shard {f} listed in {index} not found")
        return files, dict(weight_map)
    for name in weights_names:
        single = root / name
        if single.is_file():
            return [single], None
    tried = [*weights_names, *([index_name] if index_name is not None else [])]
    names = " or ".join(tried) if len(tried) <= 2 else ", ".join(tried[:-1]) + " or " + tried[-1]
    found = sorted(p.name for p in root.iterdir())
    raise FileNotFoundError(f"no {names} in {root} (it holds {found})")


def _open(file: Path) -> Any:
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read safetensors file {file}: {err}") from err


def read_shapes(
    path: str | Path,
    *,
    weights_names: Sequence[str] = (WEIGHTS_NAME,),
    index_name: str | None = INDEX_NAME,
) -> tuple[dict[str, tuple[int, ...]], dict[str, Path]]:
    """Key -> shape and key -> file of every tensor in a checkpoint directory, reading headers only.

    Args:
        path: Checkpoint directory.
        weights_names: Single-file names tried in order (see :func:`checkpoint_files`).
        index_name: Shard index name, or ``None`` for single files only (see :func:`checkpoint_files`).

    Raises:
        ValueError: naming the file when a file is corrupt, when the index lists a key that its shard lacks, or
            when two files hold the same key.
    """
    files, weight_map = checkpoint_files(path, weights_names=weights_names, index_name=index_name)
    shapes: dict[str, tuple[int, ...]] = {}
    where: dict[str, Path] = {}
    for file in files:
        with _open(file) as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                if key in where:
                    raise ValueError(f"key {key!r} is stored twice: in {where[key]} and in {file}")
                shapes[key] = tuple(handle.get_slice(key).get_shape())
                where[key] = file
    if weight_map is not None:
        index = Path(path) / (index_name or INDEX_NAME)
        for key, name in weight_map.items():
            if key not in where or where[key].name != name:
                raise ValueError(f"{index} lists {key!r} in {name}, but that file does not hold it")
    return shapes, where


def check_keys(
    expected: Mapping[str, Sequence[int]],
    found: Mapping[str, Sequence[int]],
    source: str | Path,
    where: Mapping[str, Path] | None = None,
) -> None:
    """Strict comparison of a checkpoint's keys and shapes with a model's.

    Args:
        expected: Key -> shape the model needs.
        found: Key -> shape the checkpoint holds.
        source: File or directory named in the error.
        where: Key -> file holding it; when given, mis-shaped keys also name their shard.

    Raises:
        ValueError: listing every missing, unexpected and mis-shaped key (with both shapes) and ``source``.
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [
        f"{k}: checkpoint {list(found[k])} vs model {list(expected[k])}"
        + (f" (in {where[k].name})" if where is not None and k in where else "")
        for k in sorted(set(expected) & set(found))
        if tuple(found[k]) != tuple(expected[k])
    ]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if misshaped:
            parts.append(f"mis-shaped keys [{'; '.join(misshaped)}]")
        raise ValueError(f"checkpoint {source} does not match the model: " + ", ".join(parts))


def load_state_dict(
    path: str | Path,
    expected: Mapping[str, Sequence[int]] | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    weights_names: Sequence[str] = (WEIGHTS_NAME,),
    index_name: str | None = INDEX_NAME,
) -> dict[str, Tensor]:
    """Load every tensor of a (single or sharded) safetensors checkpoint directory.

    Args:
        path: Checkpoint directory.
        expected: Key -> shape of the model; when given, checked strictly (:func:`check_keys`) from the file
            headers before any data is read, so a wrong 16 GB checkpoint fails in milliseconds.
        device: Where the tensors are created.
        dtype: Cast floating-point tensors to this dtype (``None`` keeps the stored dtype).
        weights_names: Single-file names tried in order (see :func:`checkpoint_files`).
        index_name: Shard index name, or ``None`` for single files only (see :func:`checkpoint_files`).

    Returns:
        Key -> tensor.

    Raises:
        FileNotFoundError: naming the missing directory / file.
        ValueError: naming the corrupt file, or listing missing / unexpected / mis-shaped keys.
    """
    shapes, where = read_shapes(path, weights_names=weights_names, index_name=index_name)
    if expected is not None:
        check_keys(expected, shapes, path, where)
    by_file: dict[Path, list[str]] = {}
    for key, file in where.items():
        by_file.setdefault(file, []).append(key)
    out: dict[str, Tensor] = {}
    for file, keys in by_file.items():
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as handle:
                for key in keys:
                    t = handle.get_tensor(key)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    out[key] = t
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read safetensors file {file}: {err}") from err
    return out


# ---------------------------------------------------------------------------------------------------- writing
def _refuse_meta(state_dict: Mapping[str, Tensor]) -> None:
    for key, t in state_dict.items():
        if t.is_meta:
            raise ValueError(f"cannot save {key!r}: it is on the meta device (weights were never materialised)")


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Split keys into shards in order, starting a new shard when the next tensor would overflow it.

    A tensor bigger than ``max_shard_size`` gets a shard of its own (as in ``transformers``).

    Args:
        sizes: ``(key, bytes)`` in save order.
        max_shard_size: Byte budget per shard.
    """
    if max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be > 0 bytes, got {max_shard_size}")
    shards: list[list[str]] = [[]]
    used = 0
    for key, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += nbytes
    return shards


def save_state_dict(
    state_dict: Mapping[str, Tensor],
    path: str | Path,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> list[Path]:
    """Write ``state_dict`` as ``model.safetensors`` or as shards plus ``model.safetensors.index.json``.

    Tensors are copied to CPU one shard at a time (an 8B model on GPU never needs a second full copy in host
    memory). Each file is written to a temporary name and renamed; see the module docstring for the order.

    Args:
        state_dict: Key -> tensor (no meta tensors, no two keys sharing storage).
        path: Directory (created if needed).
        max_shard_size: Byte budget per shard; everything in one file when it fits.

    Returns:
        The data files written.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    _refuse_meta(state_dict)
    sizes = [(k, t.numel() * t.element_size()) for k, t in state_dict.items()]
    shards = plan_shards(sizes, max_shard_size)
    n = len(shards)
    names = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    written: list[tuple[Path, Path]] = []
    try:
        for name, keys in zip(names, shards):
            final = root / name
            tmp = _tmp_name(final)
            tensors = {k: state_dict[k].detach().to("cpu").contiguous() for k in keys}
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            written.append((tmp, final))
        index_tmp: Path | None = None
        if n > 1:
            weight_map = {k: name for name, keys in zip(names, shards) for k in keys}
            index = {"metadata": {"total_size": sum(s for _, s in sizes)}, "weight_map": weight_map}
            index_tmp = _tmp_name(root / INDEX_NAME)
            index_tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise
    # Commit: invalidate the old index, move data in, then the new index.
    (root / INDEX_NAME).unlink(missing_ok=True)
    for tmp, final in written:
        os.replace(tmp, final)
    if index_tmp is not None:
        os.replace(index_tmp, root / INDEX_NAME)
    keep = set(names)
    for stale in root.iterdir():
        if stale.name not in keep and (stale.name == WEIGHTS_NAME or _SHARD_RE.match(stale.name)):
            stale.unlink()
    return [root / name for name in names]


def save_file_atomic(state_dict: Mapping[str, Tensor], file: str | Path) -> Path:
    """Write ``state_dict`` to one safetensors ``file`` (any name) through a temporary file and a rename.

    For single-file layouts with their own file name (e.g. ``pytorch_model.safetensors``); unlike
    :func:`save_state_dict` it never shards and never touches other files of the directory.

    Args:
        state_dict: Key -> tensor (no meta tensors, no two keys sharing storage); copied to CPU.
        file: Output file; its directory must exist.

    Returns:
        ``file``.
    """
    file = Path(file)
    _refuse_meta(state_dict)
    tmp = _tmp_name(file)
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in state_dict.items()}
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, file)
    return file
