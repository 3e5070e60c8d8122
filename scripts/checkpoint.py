"""Checkpoints written atomically, holding everything an exact resume needs.

A checkpoint is a dict saved with ``torch.save``::

    {"format": 1, "step": int, "config": RunConfig.to_dict(), "model": state_dict,
     "optimizer": state_dict, "rng": {"data": ByteTensor, "torch": ByteTensor, "cuda": [ByteTensor]?}}

``step`` counts optimizer steps already taken. "rng.data" is the state of the torch.Generator that
draws training batches, "rng.torch" the global CPU generator (dropout, init), "rng.cuda" the CUDA
generators when CUDA is in use.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

CHECKPOINT_NAME = "ckpt.pt"
FORMAT_VERSION = 1


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` so that it holds either its old content or the complete new one, never a part.

    ``write(handle)`` fills a temporary file in the same directory; it is flushed and fsynced, then
    moved over ``path`` with os.replace (atomic on POSIX). On any error the temporary file is removed
    and the error re-raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save through atomic_write."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def rng_state(data_generator: torch.Generator) -> dict[str, Any]:
    """States of the data generator, the global torch CPU generator and (if initialised) CUDA."""
    state: dict[str, Any] = {"data": data_generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], data_generator: torch.Generator) -> None:
    """Inverse of rng_state."""
    data_generator.set_state(state["data"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    data_generator: torch.Generator,
    config: dict[str, Any],
) -> None:
    """Atomically write a checkpoint (layout in the module docstring)."""
    checkpoint = {
        "format": FORMAT_VERSION,
        "step": step,
        "config": config,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(data_generator),
    }
    atomic_torch_save(checkpoint, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint (weights_only: plain data and tensors only)."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a format-{FORMAT_VERSION} checkpoint written by scripts/train.py")
    # RNG states must stay CPU ByteTensors whatever map_location says.
    checkpoint["rng"] = {
        k: ([t.cpu() for t in v] if isinstance(v, list) else v.cpu()) for k, v in checkpoint["rng"].items()
    }
    return checkpoint
