"""The resumable step loop shared by the from-scratch trainers (the default text model, the default
VLM): orbax checkpoints of the whole train state every save_every steps, resumed bitwise from the
latest; WORK/run.json guards against resuming with other settings; metrics.jsonl (one line per
step, trimmed to the checkpoint on resume); a tqdm bar; periodic validation.

Determinism is the caller's part: a step's batch must depend only on (seed, step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time
from typing import Callable

import jax

from kvjax.errors import KVJaxError
from training.checkpoints import trim_metrics


def add_run_flags(parser: argparse.ArgumentParser, config_cls, *, save_every: int, eval_every: int) -> None:
    """A trainer script's flags: one per config field, then checkpoint / validation cadence,
    --stop-after, --export-latest and --quiet."""
    for field in dataclasses.fields(config_cls):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default)
    parser.add_argument("--save-every", type=int, default=save_every)
    parser.add_argument("--eval-every", type=int, default=eval_every)
    parser.add_argument("--stop-after", type=int, help="stop after this many steps of this run (tests, time slices)")
    parser.add_argument("--export-latest", action="store_true",
                        help="export WORK's latest checkpoint to --out now (a run stopped before --steps); no training")
    parser.add_argument("--quiet", action="store_true")


def config_from_flags(args: argparse.Namespace, config_cls, work: pathlib.Path):
    """The run's config: from the flags, or with --export-latest from WORK/run.json (the run's own
    settings, whatever the flags say)."""
    if args.export_latest:
        if not args.out:
            raise KVJaxError("--export-latest writes to --out DIR: pass it")
        if (work / "run.json").is_file():
            return config_cls(**json.loads((work / "run.json").read_text()))
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})


def check_settings(work: pathlib.Path, settings: dict) -> None:
    """Write WORK/run.json, or refuse when it records a run with other settings."""
    path = work / "run.json"
    saved = json.loads(path.read_text()) if path.is_file() else None
    if saved is not None and saved != settings:
        changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        raise KVJaxError(f"{work} holds a run with other settings ({', '.join(changed)}); resume with the same "
                         "flags or choose another --work-dir")
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")


def latest_state(work: pathlib.Path, template: dict) -> tuple[dict, int]:
    """(WORK's latest checkpoint restored into template's structure, its step)."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager((work / "checkpoints").absolute()) as manager:
        step = manager.latest_step()
        if step is None:
            raise KVJaxError(f"{work} has no checkpoint; train there first")
        return manager.restore(step, args=ocp.args.StandardRestore(template)), step


def stages(work: pathlib.Path) -> list[dict]:
    """The recipe of a model grown in stages (each run --init-from the one before): for WORK and
    every run it started from, oldest first, its settings and the step of its latest checkpoint (what
    the next stage started from, unless the run went on after).
    A chain that began from an exported model starts with {"init_from": its path}."""
    chain, seen = [], set()
    while work is not None and work.resolve() not in seen:
        seen.add(work.resolve())
        if not (work / "run.json").is_file():
            chain.append({"init_from": str(work)})
            break
        settings = json.loads((work / "run.json").read_text())
        saved = [int(p.name) for p in (work / "checkpoints").glob("*") if p.name.isdigit()]
        chain.append({"work_dir": work.name, "steps_done": max(saved, default=0), "settings": settings})
        work = pathlib.Path(settings["init_from"]).expanduser() if settings.get("init_from") else None
    return chain[::-1]


def run_steps(work: pathlib.Path, settings: dict, state: dict, step_fn: Callable, *, steps: int, save_every: int,
              eval_every: int, validate: Callable[[dict], dict], init: Callable[[dict], dict] | None = None,
              stop_after: int | None = None, quiet: bool = False) -> dict | None:
    """Run step_fn(state, step) -> (state, metrics) up to `steps`, resuming from WORK/checkpoints.

    `state` is the freshly built train state (the restore template); `init(state)` replaces it on a
    fresh start (weights from another run). validate(state) -> extra metrics every eval_every steps
    and at the end. Returns the final state, or None when stop_after ended the run first.
    """
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    check_settings(work, settings)
    options = ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=save_every)
    with ocp.CheckpointManager((work / "checkpoints").absolute(), options=options) as manager:
        start = manager.latest_step() or 0
        if start:
            state = manager.restore(start, args=ocp.args.StandardRestore(state))
        elif init is not None:
            state = init(state)
        end = steps if stop_after is None else min(steps, start + stop_after)
        trim_metrics(work / "metrics.jsonl", start)
        with (work / "metrics.jsonl").open("a") as metrics:
            bar = tqdm(range(start, end), initial=start, total=steps, disable=quiet, desc="train")
            for step in bar:
                tic = time.perf_counter()
                state, out = step_fn(state, step)
                row = {"step": step + 1, **{k: float(v) for k, v in jax.device_get(out).items()},
                       "seconds": time.perf_counter() - tic}
                if (step + 1) % eval_every == 0 or step + 1 == steps:
                    row.update(validate(state))
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{row['loss']:.3f}")
                manager.save(step + 1, args=ocp.args.StandardSave(state), force=step + 1 == end)
        manager.wait_until_finished()
    return state if end == steps else None
