"""Run-folder files written atomically: checkpoints (the last k kept), metrics lines, the heartbeat.

A checkpoint of one process or of DDP (whose state is whole on every rank: rank 0 writes it), ``ckpt-<step:08d>.pt``,
is a dict saved with ``torch.save``::

    {"format": 2, "step": int, "config": RunConfig.model_dump(), "model": state_dict, "optimizer": state_dict,
     "rng": {"data": ByteTensor, "torch": ByteTensor, "cuda": [ByteTensor]?},
     "trainer": {"skipped": int, "consecutive_skips": int, "window": [step results not yet in a "train" record],
                 "train_s": training seconds so far}}

``step`` counts optimizer steps already taken; "rng.data" is the state of the generator that draws training
batches, "rng.torch" the global CPU generator, "rng.cuda" the CUDA generators when CUDA is in use. A
checkpoint never holds a non-finite weight (``save_checkpoint`` refuses). Reading a damaged file (one that does not
load, or whose zip entries fail their CRC-32) raises ``RunFolderError`` naming it and what to do.

A checkpoint of several FSDP2 processes, the folder ``ckpt-<step:08d>/``, is written through
torch.distributed.checkpoint (DCP), every rank its own shards (``__<rank>_<i>.distcp``, mapped by DCP's
``.metadata``) of {"model": state, "optimizer": {"state": per-parameter state}, "rng": {"data", "torch", "cuda"
(stacked)?}} as ``sal_harness.distributed.local_state`` gives them (DTensor shards; the replicated RNG states are
written once); then rank 0 adds ``meta.json`` = {"format": 2, "step", "config", "trainer", "processes", "files":
{name: {"bytes", "sha256"}}}. It is assembled as ``.ckpt-<step>.tmp`` and renamed when complete, so a crash never
leaves a partial folder under a checkpoint's name; reading it checks every listed file first (size and checksum)
and names the first missing, truncated or changed one. DCP reshards on load: the folder resumes on any number of
processes, and ``load_checkpoint`` reads it whole in one process (same layout as the file, "optimizer" holding
"state" only: the param groups follow from the config, which a resume checks, and the step's learning rate is
set every step). The run folder must be one that every rank sees (one machine, or a shared file system).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from sal_harness.config import usable_device
from sal_harness.distributed import World, barrier, load_local_state, local_state, min_over_ranks, sum_over_ranks
from sal_harness.errors import HarnessError, NonFiniteTrainingError, RunFolderError

FORMAT_VERSION = 2
CHECKPOINT_PATTERN = re.compile(r"ckpt-(\d{8})(\.pt)?")  # a file (one process) or a folder (several)
INFO_NAME = "meta.json"
CHECKPOINT_KEYS = frozenset({"step", "config", "model", "optimizer", "rng", "trainer"})
METRICS_NAME = "metrics.jsonl"
HEARTBEAT_NAME = "heartbeat.json"


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


def atomic_json(path: str | Path, obj: Any) -> None:
    """finite_json (indented) through atomic_write: a NaN / inf writes nothing."""
    text = finite_json(obj, path, indent=2)
    atomic_write(path, lambda handle: handle.write(text.encode()))


def finite_json(obj: Any, path: str | Path, indent: int | None = None) -> str:
    """obj as strict JSON text with a trailing newline. A NaN / inf (no JSON number: strict readers reject the
    file) raises HarnessError naming ``path``, the file it was meant for, and the entry."""
    bad = nonfinite_entry(obj)
    if bad is not None:
        raise HarnessError(f"{path} not written: its entry {bad} is not a finite number (JSON has no NaN / inf)")
    return json.dumps(obj, indent=indent, allow_nan=False) + "\n"


def nonfinite_entry(obj: Any, where: str = "") -> str | None:
    """Where the first NaN / inf float of nested dicts and lists sits ("['grid'][3]['accuracy'] = nan"), or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return f"{where or 'value'} = {obj}"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else ()
    for key, value in items:
        found = nonfinite_entry(value, f"{where}[{key!r}]")
        if found is not None:
            return found
    return None


def file_in_the_way(folder: Path) -> Path | None:
    """The existing file that keeps ``folder`` from being a folder (folder itself, or the nearest existing path
    above it when that is a file), else None."""
    for path in (folder, *folder.parents):
        if path.exists():
            return None if path.is_dir() else path
    return None


def stopped_by_time_budget(run_dir: Path, step: int) -> bool:
    """heartbeat.json records the stop at ``step`` as train.max_minutes' (the one stop short of train.max_steps that
    training ends with its final evaluation; stop_step and signals end as "finished" / "interrupted"). An unreadable
    heartbeat says no: the run then counts as unfinished."""
    try:
        beat = json.loads((run_dir / HEARTBEAT_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(beat, dict) and beat.get("status") == "time_budget" and beat.get("step") == step


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


def checkpoint_path(out_dir: Path, step: int, sharded: bool = False) -> Path:
    return out_dir / (f"ckpt-{step:08d}" if sharded else f"ckpt-{step:08d}.pt")


def list_checkpoints(out_dir: Path) -> list[Path]:
    """The run folder's checkpoints (files and folders), oldest first (by step: the names sort by it)."""
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if CHECKPOINT_PATTERN.fullmatch(p.name)]
    return sorted(found, key=lambda p: p.name)


def first_nonfinite_index(state: dict[str, torch.Tensor]) -> int:
    """The position of the first floating tensor holding a NaN / inf (of a DTensor: this process's shard), or
    len(state) when there is none."""
    from torch.distributed.tensor import DTensor

    for index, tensor in enumerate(state.values()):
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if torch.is_floating_point(local) and not bool(torch.isfinite(local).all()):
            return index
    return len(state)


# A resumed run keeps its config (the math of k steps + resume is that of the run straight): settings that would
# avoid the divergence make another run.
NONFINITE_ADVICE = ("resume=true retries from it with the same settings; to change train.lr, train.warmup_steps or "
                    "train.grad_clip, start another out_dir")


def nonfinite_error(state: dict[str, torch.Tensor], index: int, step: int, out_dir: Path) -> NonFiniteTrainingError:
    return NonFiniteTrainingError(
        f"weight {list(state)[index]!r} is not finite at step {step}: no checkpoint written (the last good one in "
        f"{out_dir} is kept); {NONFINITE_ADVICE}"
    )


def save_checkpoint(out_dir: Path, checkpoint: dict[str, Any], keep: int) -> Path:
    """Atomically write ``checkpoint`` (layout in the module docstring) as ckpt-<step>.pt, then delete all but
    the newest ``keep`` checkpoints. A non-finite weight raises NonFiniteTrainingError and writes nothing."""
    bad = first_nonfinite_index(checkpoint["model"])
    if bad < len(checkpoint["model"]):
        raise nonfinite_error(checkpoint["model"], bad, checkpoint["step"], out_dir)
    return write_checkpoint_file(out_dir, checkpoint, keep)


def write_checkpoint_file(out_dir: Path, checkpoint: dict[str, Any], keep: int) -> Path:
    path = checkpoint_path(out_dir, checkpoint["step"])
    atomic_torch_save({"format": FORMAT_VERSION, **checkpoint}, path)
    prune_checkpoints(out_dir, keep)
    return path


def save_whole_checkpoint(out_dir: Path, checkpoint: dict[str, Any], keep: int, world: World) -> Path:
    """save_checkpoint for every rank of a run whose ranks each hold the whole state (one process, or DDP): each
    rank checks its own copy for non-finite weights and all agree (every rank raises, none waits); rank 0 writes."""
    bad = min_over_ranks(first_nonfinite_index(checkpoint["model"]), world)
    if bad < len(checkpoint["model"]):
        raise nonfinite_error(checkpoint["model"], bad, checkpoint["step"], out_dir)
    path = checkpoint_path(out_dir, checkpoint["step"])
    if world.is_main:
        write_checkpoint_file(out_dir, checkpoint, keep)
    barrier(world)
    return path


def save_sharded_checkpoint(out_dir: Path, info: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                            data_generator: torch.Generator, keep: int, world: World) -> Path:
    """Every rank: write the checkpoint folder of step info["step"] (layout in the module docstring; ``info``
    holds "step", "config" and "trainer"), then rank 0 deletes all but the newest ``keep`` checkpoints. A
    non-finite weight on any rank raises NonFiniteTrainingError on every rank and writes nothing. A folder of
    this step already there is kept: it holds this very state (a run reaches a step once, and resume is exact),
    e.g. the end-of-run save right after an interval save."""
    import torch.distributed.checkpoint as dcp

    path = checkpoint_path(out_dir, info["step"], sharded=True)
    if sum_over_ranks(torch.tensor(float(path.is_dir()), device=world.device), world) > 0:  # every rank decides alike
        return path
    model_state, optimizer_state = local_state(model, optimizer)
    bad = min_over_ranks(first_nonfinite_index(model_state), world)
    if bad < len(model_state):
        raise nonfinite_error(model_state, bad, info["step"], out_dir)
    staging = out_dir / f".{path.name}.tmp"
    if world.is_main:
        for leftover in out_dir.glob(".ckpt-*"):  # staging or deleted folders of a save that crashed
            if leftover.is_dir():
                shutil.rmtree(leftover)
    barrier(world)
    dcp.save({"model": model_state, "optimizer": {"state": optimizer_state["state"]},
              "rng": rng_tensors(data_generator)}, checkpoint_id=staging)
    if world.is_main:  # dcp.save returns once every rank's shards and the .metadata are written and fsynced
        atomic_json(staging / INFO_NAME, {"format": FORMAT_VERSION, **info, "processes": world.size,
                                          "files": file_digests(staging)})
        os.replace(staging, path)
        _fsync_dir(out_dir)
        prune_checkpoints(out_dir, keep)
    barrier(world)
    return path


def rng_tensors(data_generator: torch.Generator) -> dict[str, torch.Tensor]:
    """rng_state with the CUDA generators' states stacked into one tensor (DCP stores tensors)."""
    return {k: torch.stack(v) if isinstance(v, list) else v for k, v in rng_state(data_generator).items()}


def file_digests(folder: Path) -> dict[str, dict[str, Any]]:
    """{file name: {"bytes": size, "sha256": hex digest}} of the files in ``folder``."""
    return {f.name: {"bytes": f.stat().st_size, "sha256": sha256(f)} for f in sorted(folder.iterdir()) if f.is_file()}


def sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def remove_folder(folder: Path) -> None:
    """Delete a checkpoint folder: renamed to a hidden name first, so a crash mid-delete never leaves a part of it
    under a checkpoint's name."""
    doomed = folder.with_name(f".{folder.name}.deleting")
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def prune_checkpoints(out_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (files or folders)."""
    for old in list_checkpoints(out_dir)[:-keep]:
        if old.is_dir():
            remove_folder(old)
        else:
            old.unlink()


def read_sharded_info(path: Path) -> dict[str, Any]:
    """meta.json of a checkpoint folder, once every file it lists is there, whole and unchanged; otherwise
    RunFolderError naming the file and what to do."""
    info_path = path / INFO_NAME
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunFolderError(damaged_message(path, f"is damaged: it has no {INFO_NAME}")) from None
    except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
        raise RunFolderError(damaged_message(path, f"is damaged: {info_path} cannot be read ({type(err).__name__})")) \
            from None
    files = info.get("files") if isinstance(info, dict) else None
    if (not isinstance(files, dict) or info.get("format") != FORMAT_VERSION or not isinstance(info.get("step"), int)
            or not all(isinstance(e, dict) and set(e) == {"bytes", "sha256"} for e in files.values())):
        raise RunFolderError(damaged_message(path, f"is damaged: {info_path} does not describe a format-"
                                                   f"{FORMAT_VERSION} sal_harness checkpoint"))
    for name, expected in files.items():
        problem = file_problem(path / name, expected)
        if problem is not None:
            raise RunFolderError(damaged_message(path, f"is damaged: {path / name} {problem}"))
    return info


def file_problem(path: Path, expected: dict[str, Any]) -> str | None:
    """What is wrong with a checkpoint file against its {"bytes", "sha256"} entry, or None."""
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != expected["bytes"]:
        return f"holds {size} bytes, not the {expected['bytes']} written (truncated or overwritten)"
    if sha256(path) != expected["sha256"]:
        return "does not match the checksum written with it (changed or corrupted)"
    return None


def saved_tensors(path: Path) -> dict[str, tuple[Any, tuple[str, ...]]]:
    """{flattened key: (DCP's TensorStorageMetadata, the key's path in the nested state dict)} of a checkpoint
    folder. DCP's .metadata is a pickle: read it only once read_sharded_info has checked it against meta.json."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(path).read_metadata()
    return {key: (item, metadata.planner_data[key]) for key, item in metadata.state_dict_metadata.items()
            if isinstance(item, TensorStorageMetadata)}


def dcp_load(path: Path, state: dict[str, Any], one_process: bool) -> None:
    """torch.distributed.checkpoint.load into ``state`` (in place); a failure is a RunFolderError naming the folder."""
    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():  # DCP warns that it reads in one process: here that is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=path, no_dist=one_process)
    except Exception as err:
        raise unreadable(path, err) from None


def load_sharded_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                            data_generator: torch.Generator, world: World) -> None:
    """Every rank: its part of the model and optimizer state, resharded by DCP to this number of processes, and
    the RNG states (CUDA's only where the checkpoint holds them for as many devices). Check the files first
    (read_sharded_info)."""
    saved = saved_tensors(path)
    model_state, optimizer_state = local_state(model, optimizer, placeholders=True)
    if not any(path_in_state[:2] == ("optimizer", "state") for _, path_in_state in saved.values()):
        optimizer_state = {**optimizer_state, "state": {}}  # saved before the optimizer's first step
    rng = {k: v for k, v in rng_tensors(data_generator).items()
           if f"rng.{k}" in saved and saved[f"rng.{k}"][0].size == v.shape}
    dcp_load(path, {"model": model_state, "optimizer": {"state": optimizer_state["state"]}, "rng": rng},
             one_process=world.size == 1)
    load_local_state(model, optimizer, model_state, optimizer_state)
    restore_rng_state(rng, data_generator)


def read_sharded_checkpoint(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    """A checkpoint folder read whole in this process, in the layout of a checkpoint file."""
    info = read_sharded_info(path)
    saved = saved_tensors(path)
    flat = {key: torch.empty(item.size, dtype=item.properties.dtype,
                             device="cpu" if key.startswith("rng.") else map_location)
            for key, (item, _) in saved.items()}
    dcp_load(path, flat, one_process=True)
    checkpoint = {**{k: v for k, v in info.items() if k != "files"}, "model": {}, "optimizer": {"state": {}},
                  "rng": {}}
    for key, tensor in flat.items():
        *parents, leaf = saved[key][1]
        node = checkpoint
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = tensor
    if "cuda" in checkpoint["rng"]:
        checkpoint["rng"]["cuda"] = list(checkpoint["rng"]["cuda"])
    return checkpoint


def unreadable(path: Path, err: Exception) -> RunFolderError:
    first_line = (str(err).splitlines() or [""])[0][:120]
    return RunFolderError(damaged_message(path, f"is truncated or damaged ({type(err).__name__}: {first_line})"))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint (weights_only: plain data and tensors only) or, whole, one
    written by save_sharded_checkpoint. A non-finite weight is damage (saving refuses them)."""
    # Checked first: torch.load's failure to place tensors on a device would read as a damaged file.
    usable_device(str(map_location), "map_location")
    read = read_sharded_checkpoint if path.is_dir() else read_checkpoint_file
    checkpoint = read(path, map_location)
    bad = first_nonfinite_index(checkpoint["model"])
    if bad < len(checkpoint["model"]):
        raise RunFolderError(damaged_message(path, f"holds a NaN / inf in weight {list(checkpoint['model'])[bad]!r} "
                                                   "(training never saves one: the file was changed)"))
    return checkpoint


def read_checkpoint_file(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    try:
        with zipfile.ZipFile(path) as archive:  # torch.load reads the entries without checking their CRC-32s
            changed = archive.testzip()
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # truncated zip, garbage bytes, unpickling errors (the device is usable): damage
        raise unreadable(path, err) from None
    if changed is not None:
        raise RunFolderError(damaged_message(path, f"fails its checksum (entry {changed!r} changed on disk)"))
    if (not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT_VERSION
            or not set(checkpoint) >= CHECKPOINT_KEYS):
        raise RunFolderError(damaged_message(path, f"is not a format-{FORMAT_VERSION} sal_harness checkpoint (keys "
                                                   f"{sorted(CHECKPOINT_KEYS)})"))
    # RNG states must stay CPU ByteTensors whatever map_location says.
    checkpoint["rng"] = {
        k: ([t.cpu() for t in v] if isinstance(v, list) else v.cpu()) for k, v in checkpoint["rng"].items()
    }
    return checkpoint


def damaged_message(path: Path, problem: str) -> str:
    others = [p.name for p in list_checkpoints(path.parent) if p != path]
    fallback = (f"delete it to resume from the previous checkpoint ({others[-1]})" if others
                else "no other checkpoint is left: start over with another out_dir")
    return f"checkpoint {path} {problem}: {fallback}"


RESUME_ADVICE = "start the run without resume=true, or point out_dir at the run folder to continue"


def latest_checkpoint(out_dir: Path, purpose: str = "resume", advice: str = RESUME_ADVICE) -> Path:
    """The newest checkpoint of a run folder; RunFolderError when there is none, naming the caller's ``purpose``
    and giving its ``advice``."""
    found = list_checkpoints(out_dir)
    if not found:
        raise RunFolderError(f"{purpose}: no checkpoint (ckpt-*.pt, ckpt-*/) in {out_dir}: {advice}")
    return found[-1]


def load_weights(model: nn.Module, checkpoint: dict[str, Any], path: Path) -> None:
    """model.load_state_dict(checkpoint["model"]) for the model the checkpoint's own config builds; weights that do
    not fit it raise RunFolderError naming the first mismatch."""
    mismatch = first_weight_mismatch(checkpoint["model"], model.state_dict())
    if mismatch is not None:
        raise RunFolderError(f"checkpoint {path}: its weights do not match its config (first mismatch: {mismatch}): "
                             "the file was changed after training; restore it, or use another checkpoint")
    model.load_state_dict(checkpoint["model"])


def first_weight_mismatch(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str | None:
    for name, tensor in expected.items():
        if name not in saved:
            return f"{name} is missing"
        if saved[name].shape != tensor.shape:
            return f"{name} is {list(saved[name].shape)}, the config makes it {list(tensor.shape)}"
    extra = [name for name in saved if name not in expected]
    return f"{extra[0]} is not a weight of the model the config builds" if extra else None


class MetricsLog:
    """Append-only JSON-lines file (one record per line; each line is flushed as written)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def start_fresh(self) -> None:
        atomic_write(self.path, lambda handle: None)

    def read(self) -> list[dict[str, Any]]:
        """Every record; a torn or garbage line raises RunFolderError naming the file, the line and the fix."""
        if not self.path.exists():
            return []
        text = self.path.read_text(encoding="utf-8")
        records = []
        lines = text.split("\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            torn = number == len(lines)  # the last line lacks its newline: a write was cut off
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if torn or not isinstance(record, dict):
                what = "is torn (cut off mid-write)" if torn else "is not a JSON object"
                raise RunFolderError(f"{self.path} line {number} {what}: delete that line (e.g. sed -i '{number}d' "
                                     f"{self.path}) and resume")
            records.append(record)
        return records

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after ``step`` (what a resumed run will write again)."""
        kept = "".join(json.dumps(r) + "\n" for r in self.read() if r.get("step", 0) <= step)
        atomic_write(self.path, lambda handle: handle.write(kept.encode()))

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
