"""Synthetic tasks with exact verifiers: the embedded default data (DESIGN.md §4).

A task generates seeded, deterministic train/val samples, checks a completion exactly, and writes its
samples into WebDataset shards in a cache folder on first use, keyed by a fingerprint of its settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from dllm_zoo.data.shards import write_shards

Split = Literal["train", "val"]
SPLITS: tuple[Split, ...] = ("train", "val")
MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    """``$DLLM_ZOO_CACHE`` if set, else ``~/.cache/dllm_zoo``."""
    env = os.environ.get("DLLM_ZOO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dllm_zoo"


class SyntheticTask(ABC):
    """Base class of the synthetic tasks; its public subclasses are the ``task`` registry.

    Subclasses set :attr:`name`, implement :meth:`generate`, :meth:`check` and :meth:`settings`, and bump
    :attr:`version` whenever the generator's output changes for the same settings (old caches are then
    ignored).
    """

    name: ClassVar[str] = "task"
    """Short name; the cache folder is ``<cache_dir>/<name>-<fingerprint>``."""
    version: ClassVar[int] = 1
    """Generator version, part of the fingerprint."""
    shards_per_split: ClassVar[int] = 16
    """Target number of shards per split (fewer for tiny splits), so several ranks x workers can share them."""

    @abstractmethod
    def generate(self, split: Split) -> Iterator[dict[str, Any]]:
        """The samples of ``split``, in a fixed order determined by the settings (seeded)."""

    @abstractmethod
    def check(self, completion: str, sample: dict[str, Any]) -> bool:
        """Whether ``completion`` (the model's response text) solves ``sample`` exactly."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """Every setting that changes the generated samples (JSON-serialisable)."""

    @abstractmethod
    def num_samples(self, split: Split) -> int:
        """Number of samples :meth:`generate` yields for ``split``."""

    @property
    def vocabulary(self) -> tuple[str, ...]:
        """The words this task's text is made of, for a closed-vocabulary tokenizer (``WordTokenizer``).

        Empty by default (the task's text stays bytes). It need not be complete: words outside it are bytes.
        """
        return ()

    def fingerprint(self) -> str:
        """A 12-hex-digit hash of the class, its version, its settings and the shard count."""
        payload = {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "version": self.version,
            "shards_per_split": self.shards_per_split,
            "settings": self.settings(),
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def cache_path(self, cache_dir: str | Path | None = None) -> Path:
        """The folder this task's shards live in: ``<cache_dir>/<name>-<fingerprint>``."""
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        return root / f"{self.name}-{self.fingerprint()}"

    def ensure_shards(self, cache_dir: str | Path | None = None) -> dict[str, str]:
        """Write the train and val shards on first use and return their specs.

        The shards are written into a temporary sibling folder which is renamed into place only when complete
        (with a manifest), so an interrupted write is never mistaken for a cache; a concurrent writer that wins
        the rename is used as is. An existing folder is trusted only if its manifest matches.

        Args:
            cache_dir: Root of the cache (default :func:`default_cache_dir`).

        Returns:
            ``{"train": spec, "val": spec}``, brace patterns of the shard files.
        """
        final = self.cache_path(cache_dir)
        specs = self._read_manifest(final)
        if specs is not None:
            return specs
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{uuid.uuid4().hex[:8]}-", dir=final.parent))
        try:
            manifest: dict[str, Any] = {
                "task": self.name,
                "fingerprint": self.fingerprint(),
                "settings": self.settings(),
            }
            for split in SPLITS:
                n = self.num_samples(split)
                per_shard = max(1, math.ceil(n / self.shards_per_split))
                paths = write_shards(self.generate(split), tmp / split, prefix=split, samples_per_shard=per_shard)
                manifest[split] = {"samples": n, "shards": len(paths)}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            try:
                os.rename(tmp, final)
            except OSError as exn:
                if self._read_manifest(final) is None:  # not a concurrent writer's finished cache
                    raise RuntimeError(
                        f"cache folder {final} exists but is not a complete dllm_zoo cache (no valid {MANIFEST} "
                        "or missing shards); delete it or pass another cache_dir (--data.cache_dir)"
                    ) from exn
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        specs = self._read_manifest(final)
        assert specs is not None
        return specs

    def _read_manifest(self, folder: Path) -> dict[str, str] | None:
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if manifest.get("fingerprint") != self.fingerprint():
            return None
        specs: dict[str, str] = {}
        for split in SPLITS:
            count = int(manifest[split]["shards"])
            if count == 0:
                return None
            paths = [folder / split / f"{split}-{i:06d}.tar" for i in range(count)]
            if not all(p.is_file() for p in paths):
                return None
            specs[split] = str(folder / split / f"{split}-{{000000..{count - 1:06d}}}.tar")
        return specs
