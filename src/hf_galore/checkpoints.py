"""Which checkpoint a resume may load, and whether its files belong together.

transformers writes a checkpoint file by file, in place (weights, `optimizer.pt`, `scheduler.pt`, RNG states, and
`trainer_state.json` last), and `resume_from_checkpoint=True` picks the newest `checkpoint-*` folder whether or not
its save finished. A job killed mid-save leaves a folder that fails deep inside the load, or loads half. These
functions tell a complete checkpoint from a half-written or damaged one and say, naming the file, what to do.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zipfile

from .log import warn_at_caller

TRAINER_STATE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME: written last
OPTIMIZER_FILE = "optimizer.pt"  # transformers' OPTIMIZER_NAME
SCHEDULER_FILE = "scheduler.pt"  # transformers' SCHEDULER_NAME
CHECKPOINT_FOLDER = re.compile(r"^checkpoint-(\d+)$")  # what transformers' get_last_checkpoint considers
TORCH_SAVE_SUFFIXES = (".pt", ".pth", ".bin")
FRESH_OPTIMIZER_ENV = "HF_GALORE_FRESH_OPTIMIZER"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
_EARLIER = "resume_from_checkpoint=True picks the newest complete checkpoint"


def fresh_optimizer_requested() -> bool:
    """Whether `HF_GALORE_FRESH_OPTIMIZER` asks a resume to start the optimizer afresh (unset: no)."""
    value = os.environ.get(FRESH_OPTIMIZER_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"Invalid {FRESH_OPTIMIZER_ENV}={os.environ[FRESH_OPTIMIZER_ENV]!r}: must be 1/true/yes/on (start the "
        "optimizer afresh on resume) or 0/false/no/off/unset (load it from the checkpoint)."
    )


def unreadable_checkpoint_reason(path: str) -> str | None:
    """Why `path` (a file torch.save wrote) cannot be read, or None when it looks whole (or does not exist).

    torch.save writes a zip archive whose directory sits at its end: a save cut short leaves a file of 0 bytes (the
    kill came before its bytes) or a zip header ("PK") without the directory, where torch.load reports only an
    `EOFError` or "failed finding central directory"; other bytes make it advise `weights_only=False`, which would not
    help. A pre-1.6 pickle file (first byte 0x80) is left to torch.
    """
    if not os.path.isfile(path) or zipfile.is_zipfile(path):
        return None
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(2)
    if size == 0:
        return f"{path} is empty (0 bytes): the save that created it was cut short"
    if head == b"PK":
        return f"{path} is truncated ({size:,} bytes, its zip directory is missing): the save writing it was cut short"
    if head[:1] == b"\x80":
        return None
    return f"{path} is not a file torch.save wrote ({size:,} bytes, no zip archive): it is damaged or was replaced"


def _unreadable_safetensors_reason(path: str) -> str | None:
    """Why a safetensors file is cut short: its header names more bytes than the file holds."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
        try:
            header = json.loads(handle.read(header_len)) if header_len is not None and header_len < size else None
        except ValueError:
            header = None
    if header is None:
        return f"{path} has no readable safetensors header ({size:,} bytes): it is damaged or was cut short"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    needed = 8 + header_len + max(ends, default=0)
    if needed > size:
        return f"{path} is truncated ({size:,} of its {needed:,} bytes): the save that wrote it was cut short"
    return None


def checkpoint_problem(folder: str, skip: tuple[str, ...] = ()) -> str | None:
    """Why `folder` is not a complete checkpoint (half-written or damaged), or None. Files named in `skip` (those a
    resume will not read) are not checked.

    `trainer_state.json` is written last, so a folder without it, or with it cut short, is a save that never ended;
    every file torch.save or safetensors wrote must be whole, and a distributed-checkpoint folder must have the
    `.metadata` its save writes last.
    """
    state = os.path.join(folder, TRAINER_STATE)
    if not os.path.isfile(state):
        return f"{folder} has no {TRAINER_STATE} (the Trainer writes it last: its save was cut short)"
    try:
        with open(state, encoding="utf-8") as handle:
            json.load(handle)
    except ValueError:
        return f"{state} is not valid JSON ({os.path.getsize(state):,} bytes): its save was cut short"
    for name in sorted(set(os.listdir(folder)) - set(skip)):
        path = os.path.join(folder, name)
        if name.endswith(TORCH_SAVE_SUFFIXES):
            reason = unreadable_checkpoint_reason(path)
        elif name.endswith(".safetensors") and os.path.isfile(path):
            reason = _unreadable_safetensors_reason(path)
        elif os.path.isdir(path) and any(f.endswith(".distcp") for f in os.listdir(path)):
            reason = None if os.path.isfile(os.path.join(path, ".metadata")) else f"{path} has no .metadata"
        else:
            reason = None
        if reason:
            return reason
    return None


def _checkpoints_newest_first(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    found = [
        (int(match.group(1)), os.path.join(output_dir, name))
        for name in os.listdir(output_dir)
        if (match := CHECKPOINT_FOLDER.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    ]
    return [path for _, path in sorted(found, reverse=True)]


def _not_read() -> tuple[str, ...]:
    """The files a resume will not read: the optimizer's and scheduler's when a fresh optimizer is asked for."""
    return (OPTIMIZER_FILE, SCHEDULER_FILE) if fresh_optimizer_requested() else ()


def newest_complete_checkpoint(output_dir: str) -> str | None:
    """The newest complete `checkpoint-*` folder in `output_dir` (None when there is none at all).

    Newer folders that are half-written or damaged are skipped, with one warning naming each and why; when every
    folder is, it raises, naming them. Nothing is moved or deleted: the next save of that step rewrites the folder.
    """
    candidates = _checkpoints_newest_first(output_dir)
    skipped = []
    for folder in candidates:
        problem = checkpoint_problem(folder, _not_read())
        if problem is None:
            if skipped:
                warn_at_caller(
                    f"Resuming from {folder}, the newest complete checkpoint, and skipping newer ones that cannot be "
                    f"loaded: {'; '.join(skipped)}. Their steps are trained again (delete the folder(s) if you like)."
                )
            return folder
        skipped.append(problem)
    if skipped:
        raise ValueError(
            f"Cannot resume from {output_dir}: none of its {len(skipped)} checkpoint folder(s) is complete: "
            f"{'; '.join(skipped)}. Train from the start (resume_from_checkpoint=None), or restore a whole checkpoint."
        )
    return None


def check_complete(folder: str) -> None:
    """Refuse a `resume_from_checkpoint` path that is half-written or damaged, before anything of it is loaded."""
    problem = checkpoint_problem(folder, _not_read()) if os.path.isdir(folder) else None
    if problem is None:
        return
    parent = os.path.dirname(os.path.normpath(folder))
    earlier = [f for f in _checkpoints_newest_first(parent) if f != folder and checkpoint_problem(f) is None]
    where = f"{earlier[0]} ({_EARLIER})" if earlier else "an earlier checkpoint"
    if checkpoint_problem(folder, (OPTIMIZER_FILE, SCHEDULER_FILE)) is None:  # only the optimizer's files
        where += f", or set {FRESH_OPTIMIZER_ENV}=1 to load its weights and start the optimizer afresh"
    raise ValueError(f"Cannot resume from {folder}: {problem}. Resume from {where}, or train from the start.")


def _missing_optimizer_files(folder: str) -> list[str]:
    """The optimizer/scheduler files `folder` lacks, as transformers looks for them (it loads both or neither)."""
    optimizer = (
        os.path.isfile(os.path.join(folder, OPTIMIZER_FILE))
        or os.path.isfile(os.path.join(folder, "optimizer.bin"))
        or any("optimizer" in name for name in os.listdir(folder) if os.path.isdir(os.path.join(folder, name)))
    )
    missing = [] if optimizer else [OPTIMIZER_FILE]
    return missing + ([] if os.path.isfile(os.path.join(folder, SCHEDULER_FILE)) else [SCHEDULER_FILE])


def check_optimizer_files(folder: str, *, galore: bool) -> None:
    """A checkpoint without `optimizer.pt` or `scheduler.pt` would resume with a fresh optimizer and say nothing
    (transformers loads the pair or neither): refused for a GaLore optimizer, a warning for others, unless
    `HF_GALORE_FRESH_OPTIMIZER` asks for exactly that."""
    missing = _missing_optimizer_files(folder) if os.path.isdir(folder) else []
    if not missing or fresh_optimizer_requested():
        return
    message = (
        f"{folder} has no {' or '.join(missing)} (saved with save_only_model=True, or deleted), so the optimizer "
        "would start afresh: empty state, new bases at the first step, the learning rate schedule back at its start. "
        f"Set {FRESH_OPTIMIZER_ENV}=1 if that is what you want (the schedule then continues at the checkpoint's "
        "step), or resume from a checkpoint that has both files."
    )
    if galore:
        raise ValueError(f"Cannot resume: {message}")
    warn_at_caller(f"Resuming without the optimizer: {message}")
