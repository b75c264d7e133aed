"""Run checkpoints (orbax CheckpointManager) and the output-directory rules.

A run checkpoint holds the whole train state (compressor params, optimizer and plateau state,
seed key) as a flat dict of arrays, plus a JSON record of the step, the data position, the best
validation loss and the shapes it was made for. Restoring unflattens into a freshly built state
of the same structure, so a resumed run continues bitwise where the saved one stopped.
"""

from __future__ import annotations

import pathlib
import shutil

import jax
import numpy as np

from kvjax.errors import KVJaxError

CHECKPOINT_DIR = "checkpoints"
KEEP = 2  # periodic checkpoints kept (the latest is what --resume reads)


def prepare_out_dir(out, *, resume: bool, overwrite: bool) -> pathlib.Path:
    """Refuse an existing non-empty --out unless --resume/--overwrite; nothing is deleted here."""
    out = pathlib.Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise KVJaxError(f"--out {out} is a file; choose a directory")
    is_used = out.is_dir() and any(out.iterdir())
    if resume:
        if latest_step(out) is None:
            fix = ("start over there with --overwrite (instead of --resume), or choose another --out" if is_used
                   else "drop --resume to start a new run")
            raise KVJaxError(f"--resume: {out} holds no training checkpoint; {fix}")
    elif is_used and not overwrite:
        raise KVJaxError(f"--out {out} exists and is not empty; pass --resume to continue that run, "
                         "--overwrite to replace it, or choose another directory")
    return out


def clear_out_dir(out: pathlib.Path) -> None:
    """--overwrite: called only once the model, data and config have been checked."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)


def _manager(out: pathlib.Path):
    import orbax.checkpoint as ocp  # noqa: PLC0415 (slow import; only checkpoint I/O needs it)

    return ocp.CheckpointManager(out / CHECKPOINT_DIR, options=ocp.CheckpointManagerOptions(max_to_keep=KEEP,
                                                                                             create=True))


def latest_step(out: pathlib.Path) -> int | None:
    if not (pathlib.Path(out) / CHECKPOINT_DIR).is_dir():
        return None
    with _manager(pathlib.Path(out)) as manager:
        return manager.latest_step()


def save(out: pathlib.Path, step: int, state, record: dict) -> None:
    """Write the train state pytree and the JSON record as checkpoint `step` (blocking)."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    leaves = {f"{i:05d}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(state))}
    with _manager(out) as manager:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(leaves),
                                                   record=ocp.args.JsonSave(record)), force=True)
        manager.wait_until_finished()


def restore(out: pathlib.Path, template) -> tuple[object, dict]:
    """The latest checkpoint unflattened into `template`'s structure, and its record."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    leaves, treedef = jax.tree.flatten(template)
    target = {f"{i:05d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    with _manager(out) as manager:
        step = manager.latest_step()
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                     record=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for missing or mismatched files
            raise KVJaxError(f"cannot restore {out / CHECKPOINT_DIR}/{step} ({type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0]}); it was made by another setup, use --overwrite")
    arrays = restored["state"]
    if sorted(arrays) != sorted(target) or any(arrays[k].shape != target[k].shape for k in target):
        raise KVJaxError(f"the checkpoint in {out / CHECKPOINT_DIR} does not match this model/compressor; "
                         "resume with the same settings or start over with --overwrite")
    new_leaves = [jax.numpy.asarray(arrays[k], dtype=leaf.dtype) for k, leaf in zip(sorted(target), leaves)]
    return jax.tree.unflatten(treedef, new_leaves), dict(restored["record"])


def trim_metrics(path: pathlib.Path, step: int) -> None:
    """--resume: drop metrics lines written after checkpoint `step` (the resumed run writes them again)."""
    import json  # noqa: PLC0415

    if path.is_file():
        lines = [line for line in path.read_text().splitlines(keepends=True) if line.strip()]
        path.write_text("".join(line for line in lines if json.loads(line)["step"] <= step))
