"""What every stage does around its real work: seeding, logging, atomic output and metadata.json.

A stage writes into a temporary sibling folder (`models/.teacher_model.partial-<id>`) and renames it into
place only when everything, `metadata.json` last, is written. A crash or Ctrl-C removes the temporary
folder and leaves any earlier output untouched; a successful rerun replaces the earlier folder. So the
presence of `metadata.json` in a stage folder means that stage finished.

Each metadata.json carries a `run_id`; downstream stages record the run_id of the folder they read, which
lets later stages and the report notice an upstream folder that was rebuilt since (a stale output).
"""

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from common.paths import REPO_ROOT, STAGE_SCRIPTS

METADATA = "metadata.json"
LOG_FILE = "stage.log"
logger = logging.getLogger("dpq")


class StageError(RuntimeError):
    """A precondition of a stage is not met; the message says which stage to run or what to fix."""


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def setup_logging() -> None:
    """Console logging for the `dpq` logger (idempotent)."""
    logger.setLevel(logging.INFO)
    if not any(getattr(h, "_dpq_console", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        handler._dpq_console = True
        logger.addHandler(handler)
    logger.propagate = False


def read_metadata(folder) -> dict:
    path = Path(folder) / METADATA
    with open(path) as f:
        return json.load(f)


def require_stage(folder, stage: str) -> dict:
    """Check that `folder` holds a finished stage output; return its metadata.

    Raises StageError naming the script to run when the folder is missing or half-made.
    """
    folder = Path(folder)
    script = STAGE_SCRIPTS.get(stage, "the stage that writes it")
    if not folder.is_dir():
        raise StageError(f"{folder} does not exist: run `python {script}` first.")
    if not (folder / METADATA).is_file():
        raise StageError(
            f"{folder} has no {METADATA}, so the stage that writes it did not finish: "
            f"run `python {script}` again."
        )
    try:
        return read_metadata(folder)
    except json.JSONDecodeError as err:
        raise StageError(f"{folder / METADATA} is not valid JSON ({err}): run `python {script}` again.") from None


def check_preset(folder, meta: dict, preset: str, stage: str) -> None:
    """Refuse a stage folder made for another preset; the message names the script to rerun."""
    made_for = meta.get("results", {}).get("preset")
    if made_for and made_for != preset:
        script = STAGE_SCRIPTS.get(stage, "the stage that writes it")
        raise StageError(f"{folder} was made for preset {made_for!r}, this run uses PRESET={preset!r}: "
                         f"run `PRESET={preset} python {script}` first, or set PRESET={made_for}")


def upstream_record(folder, stage: str) -> dict:
    """What a downstream stage stores about a folder it read: path, stage and run_id."""
    meta = require_stage(folder, stage)
    return {"stage": stage, "folder": str(Path(folder)), "run_id": meta.get("run_id")}


def is_stale(meta: dict) -> list:
    """The upstream folders recorded in `meta` that were rebuilt (or removed) since; [] when fresh."""
    stale = []
    for record in meta.get("upstream", {}).values():
        folder = Path(record["folder"])
        try:
            current = read_metadata(folder).get("run_id")
        except (OSError, json.JSONDecodeError):
            current = None
        if current != record.get("run_id"):
            stale.append(str(folder))
    return stale


def json_dump(obj, path) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


class StageOutput:
    """The temporary folder a stage writes into, plus what goes into its metadata.json."""

    def __init__(self, final_dir: Path, tmp_dir: Path, stage: str):
        self.final_dir = final_dir
        self.dir = tmp_dir
        self.stage = stage
        self.results = {}
        self.upstream = {}
        self.extra = {}

    def add_upstream(self, folder, stage: str) -> dict:
        self.upstream[stage] = upstream_record(folder, stage)
        return self.upstream[stage]


@contextmanager
def stage_output(final_dir, stage: str, config: dict, seed: int):
    """Write a stage folder atomically.

    with stage_output(stage_dir("teacher"), "teacher", as_dict(cfg), cfg.SEED) as out:
        model.save_pretrained(out.dir); out.results["accuracy"] = ...
    """
    setup_logging()
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:12]
    for leftover in final_dir.parent.glob(f".{final_dir.name}.partial-*"):
        # left by a run that was killed outright (SIGKILL, power loss): never a usable output
        logger.info(f"[{stage}] removing {leftover.name}, left by an interrupted run")
        shutil.rmtree(leftover, ignore_errors=True)
    tmp_dir = final_dir.parent / f".{final_dir.name}.partial-{run_id}"
    tmp_dir.mkdir()
    log_handler = logging.FileHandler(tmp_dir / LOG_FILE)
    log_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(log_handler)
    out = StageOutput(final_dir, tmp_dir, stage)
    started = time.time()
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    logger.info(f"[{stage}] writing {final_dir} (run {run_id}, seed {seed})")
    try:
        yield out
        meta = {
            "stage": stage,
            "run_id": run_id,
            "created": created,
            "wall_time_s": round(time.time() - started, 1),
            "git_commit": git_commit(),
            "seed": seed,
            "config": config,
            "upstream": out.upstream,
            "results": out.results,
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "versions": library_versions(),
        }
        meta.update(out.extra)
        logger.removeHandler(log_handler)
        log_handler.close()
        json_dump(meta, tmp_dir / METADATA)  # written last: its presence means the stage finished
        old = None
        if final_dir.exists():
            old = final_dir.parent / f".{final_dir.name}.old-{run_id}"
            os.replace(final_dir, old)
            logger.info(f"[{stage}] replacing the earlier {final_dir.name}")
        os.replace(tmp_dir, final_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        logger.info(f"[{stage}] done in {meta['wall_time_s']:.0f}s -> {final_dir}")
    except BaseException:
        logger.removeHandler(log_handler)
        log_handler.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def library_versions() -> dict:
    import importlib.metadata as md

    versions = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "accelerate", "bitsandbytes", "fvcore", "datasets"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return versions


def run_main(main) -> None:
    """Entry point for stage scripts: known, explained failures exit 1 with the message, no traceback."""
    from common.config import ConfigError
    from common.data import DataError

    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)  # so a killed stage still removes its partial folder
    try:
        main()
    except KeyboardInterrupt as err:
        print(f"interrupted ({err or 'Ctrl-C'}): nothing was written over earlier outputs", file=sys.stderr)
        sys.exit(130)
    except (StageError, ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
