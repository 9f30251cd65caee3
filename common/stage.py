"""What every stage does around its real work: seeding, logging, atomic output, locking and metadata.json.

A stage writes into a temporary sibling folder (`models/.teacher_model.partial-<pid>-<id>`) and renames it into
place only when everything, `metadata.json` last, is written. A crash or Ctrl-C removes the temporary
folder and leaves any earlier output untouched; a successful rerun replaces the earlier folder. So the
presence of `metadata.json` in a stage folder means that stage finished.

One run at a time per output folder: `stage_output` holds a lock (`models/.teacher_model.lock`, an exclusive
flock, with the owner's pid and start time inside) while it writes. A second run of the same stage refuses to
start, naming the pid that holds the folder; a lock whose owner died is released by the kernel and taken over,
and a temporary folder is only removed once the process named in it is gone.

Each metadata.json carries a `run_id`; downstream stages record the folders they read (`upstream`: folder
relative to the models root, stage, run_id) and the checksum of the prepared data they trained or evaluated on
(`data_sha256`). `is_stale` follows those records transitively: a folder is stale when anything it was built
from, directly or through its upstream folders, was rebuilt, removed or (the data) changed since.

Logging: `setup_logging()` (called when a stage starts) logs to the console at once; lines logged while no stage
folder is open are kept and written at the top of the `stage.log` of every folder the run opens afterwards.

Several processes (`torchrun --nproc_per_node N <stage>`): every process runs the whole stage, but only the main
one (`is_main_process()`, rank 0 from the `RANK` variable the launcher sets) writes: the others get a throwaway
temporary folder from `stage_output` (no lock, no metadata, no cleaning of leftovers) and log warnings only. With
`DPQ_PROCESS_RECORDS=<folder>` each process writes what its main() returned to `<folder>/rank<R>.json`.
"""

import fcntl
import hashlib
import importlib.metadata as md
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from common.config import ConfigError
from common.data import DataError, check_prepared, current_data_sha256, data_sha256
from common.export import ExportError
from common.paths import REPO_ROOT, STAGE_SCRIPTS, models_root, stage_of_folder

METADATA = "metadata.json"
LOG_FILE = "stage.log"
logger = logging.getLogger("dpq")


class StageError(RuntimeError):
    """A precondition of a stage is not met; the message says which stage to run or what to fix."""


def process_rank() -> int:
    """This process's rank in a multi-process run (`RANK`, set by torchrun and accelerate launch); 0 when alone."""
    return int(os.environ.get("RANK") or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE") or 1)


def is_main_process() -> bool:
    """Whether this process writes folders, caches and logs: the only one when run alone, rank 0 under torchrun."""
    return process_rank() == 0


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


def code_sha256(script) -> str:
    """sha256 over the source of `script` (a stage script) and of every module of the `common` package: two
    outputs with the same fingerprint were made by the same code (edits to other stage scripts do not count)."""
    digest = hashlib.sha256()
    for path in [Path(script)] + sorted((REPO_ROOT / "common").rglob("*.py")):
        digest.update(path.relative_to(REPO_ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


LOG_FORMAT = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
_BOOKKEEPING = {"dpq_bookkeeping": True}  # stage_output's own lines after a folder closed: not preamble


class _Console(logging.StreamHandler):
    """The console: whatever sys.stdout is when a line is logged (a redirected stdout, pytest's capture)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


class _Preamble(logging.Handler):
    """Lines logged while no stage folder is open (the last LIMIT), for the stage.log of the next folders."""

    LIMIT = 2000

    def __init__(self):
        super().__init__()
        self.lines = []
        self.open_folders = 0
        self.setFormatter(LOG_FORMAT)

    def emit(self, record):
        if self.open_folders or getattr(record, "dpq_bookkeeping", False):
            return
        self.lines.append(self.format(record))
        del self.lines[:-self.LIMIT]


def _handlers():
    """(console, preamble) of the `dpq` logger, created on first use."""
    logger.setLevel(logging.INFO)
    logger.propagate = False
    console = next((h for h in logger.handlers if isinstance(h, _Console)), None)
    if console is None:
        console = _Console()
        console.setFormatter(LOG_FORMAT)
        if not is_main_process():  # the other processes of a multi-process run: warnings and errors only
            console.setLevel(logging.WARNING)
        logger.addHandler(console)
    preamble = next((h for h in logger.handlers if isinstance(h, _Preamble)), None)
    if preamble is None:
        preamble = _Preamble()
        logger.addHandler(preamble)
    return console, preamble


def setup_logging() -> None:
    """A stage starts: console logging from now on, and a fresh preamble (the lines logged before its first
    output folder opens, which go into that folder's stage.log too). Idempotent apart from the reset."""
    _, preamble = _handlers()
    preamble.lines.clear()


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


def writer_script(folder) -> str:
    """The script that writes `folder` (the stage in its metadata.json, else the one its name says)."""
    folder = Path(folder)
    stage = None
    try:
        stage = read_metadata(folder).get("stage")
    except (OSError, ValueError, AttributeError):
        pass
    return STAGE_SCRIPTS.get(stage or stage_of_folder(folder.name), "the stage that writes it")


def upstream_record(folder, stage: str, root=None) -> dict:
    """What a downstream stage stores about a folder it read: the folder RELATIVE to the models root (`root`,
    default models_root(); so a moved or copied models/ stays consistent), its stage and run_id."""
    meta = require_stage(folder, stage)
    root = Path(root) if root is not None else models_root()
    relative = os.path.relpath(Path(folder).resolve(), root.resolve())
    return {"stage": stage, "folder": Path(relative).as_posix(), "run_id": meta.get("run_id")}


def resolve_upstream(record: dict, root) -> Path:
    """The folder an upstream record names, under the models root `root`. Records written before they were
    relative hold an absolute path: the folder of that name under `root` is used when it exists."""
    recorded = Path(record.get("folder", ""))
    if not recorded.is_absolute():
        return Path(root) / recorded
    local = Path(root) / recorded.name
    return local if local.exists() or not recorded.exists() else recorded


DATA_LABEL = "data/sst2"


def stale_reasons(meta: dict, root=None) -> list:
    """What `meta`'s folder was built from that changed since, followed through every upstream folder:
    [{"changed": "teacher_model", "how": "rebuilt since", "via": ["student_model"], "rerun": ["student"]}]
    ("via": the upstream folders in between, nearest first; "rerun": their stages). [] when fresh."""
    root = Path(root) if root is not None else models_root()
    data_now = []  # computed once, on first need

    def walk(meta, root, via, seen):
        reasons = []
        if meta.get("data_sha256"):
            if not data_now:
                data_now.append(current_data_sha256())
            if data_now[0] != meta["data_sha256"]:
                how = "changed since" if data_now[0] else "missing"
                reasons.append({"changed": DATA_LABEL, "how": how, "via": via})
        for stage, record in meta.get("upstream", {}).items():
            folder = resolve_upstream(record, root)
            try:
                upstream = read_metadata(folder)
            except (OSError, ValueError):
                upstream = None
            if upstream is None:
                reasons.append({"changed": folder.name, "how": "removed or unfinished since", "via": via})
            elif upstream.get("run_id") != record.get("run_id"):
                reasons.append({"changed": folder.name, "how": "rebuilt since", "via": via})
            elif folder.resolve() not in seen:
                reasons += walk(upstream, folder.parent, via + [(folder.name, stage)], seen | {folder.resolve()})
        return reasons

    found = walk(meta, root, [], frozenset())
    return [dict(r, via=[name for name, _ in r["via"]], rerun=[stage for _, stage in r["via"]]) for r in found]


def describe_stale(reasons: list) -> list:
    """One phrase per changed input ('teacher_model rebuilt since (via student_model)'), nearest path first."""
    out, seen = [], set()
    for r in sorted(reasons, key=lambda r: len(r["via"])):
        if (r["changed"], r["how"]) in seen:
            continue
        seen.add((r["changed"], r["how"]))
        out.append(f"{r['changed']} {r['how']}" + (f" (via {' <- '.join(r['via'])})" if r["via"] else ""))
    return out


def rerun_commands(reasons: list, stages) -> str:
    """The scripts that make stale folders of `stages` (one stage or several) fresh again, in pipeline order:
    '`python 2_distill_student.py`, then `python 8_pruning_with_finetuning.py`'."""
    order = list(STAGE_SCRIPTS)
    stages = {s for r in reasons for s in r["rerun"]} | ({stages} if isinstance(stages, str) else set(stages))
    scripts = []
    for s in sorted(stages, key=lambda s: order.index(s) if s in order else len(order)):
        script = STAGE_SCRIPTS.get(s, s)
        if script not in scripts:
            scripts.append(script)
    return ", then ".join(f"`python {script}`" for script in scripts)


def is_stale(meta: dict, root=None) -> list:
    """What the folder of `meta` was built from, directly or not, that changed since (upstream folders rebuilt
    or removed, the data changed), one phrase each; [] when fresh. `root`: the models root the folder is in."""
    return describe_stale(stale_reasons(meta, root))


def require_fresh(folder, meta: dict, stage: str) -> None:
    """Refuse a stale input folder, naming what changed and the scripts to rerun."""
    reasons = stale_reasons(meta, Path(folder).parent)
    if reasons:
        raise StageError(f"{folder} is stale ({'; '.join(describe_stale(reasons))}): run "
                         f"{rerun_commands(reasons, stage)} again first")


def stale_folders(root=None) -> dict:
    """{folder name: stale phrases} for every finished stage folder under the models root that is stale."""
    root = Path(root) if root is not None else models_root()
    out = {}
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            if folder.name.startswith(".") or not (folder / METADATA).is_file():
                continue
            try:
                stale = is_stale(read_metadata(folder), root)
            except (OSError, ValueError):
                continue
            if stale:
                out[folder.name] = stale
    return out


def json_roundtrip(obj):
    """`obj` as it reads back from a file written by json_dump (tuples become lists): for comparing with metadata."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


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
        self.upstream[stage] = upstream_record(folder, stage, root=self.final_dir.parent)
        return self.upstream[stage]

    def add_data(self, folder=None) -> str:
        """Record the checksum of the prepared data this stage trained or evaluated on (`data_sha256`)."""
        self.extra["data_sha256"] = data_sha256(check_prepared(folder))
        return self.extra["data_sha256"]


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _read_owner(fd) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        owner = json.loads(os.read(fd, 4096).decode() or "{}")
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


@contextmanager
def folder_lock(final_dir, stage: str):
    """Hold `.<folder>.lock` beside `final_dir` (an exclusive flock: the kernel releases it when its owner dies,
    however it dies), with the owner's pid and start time inside. Refuses (StageError naming the pid and the
    folder) while another live process holds it; yields what a previous, dead owner left in it ({} if none)."""
    final_dir = Path(final_dir)
    path = final_dir.parent / f".{final_dir.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            who = f"pid {owner['pid']}" if owner.get("pid") else "another process"
            since = f", {owner.get('command', 'a stage')} started {owner['started']}" if owner.get("started") else ""
            raise StageError(f"{final_dir} is being written by another run ({who}{since}): wait for it to finish "
                             f"or stop it; two runs of one stage would overwrite each other's {final_dir.name}")
        try:  # the previous owner may have removed the file between our open and flock: lock the current one
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    previous = _read_owner(fd)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps({"pid": os.getpid(), "stage": stage,
                             "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}).encode())
    try:
        yield previous
    finally:
        try:
            os.unlink(path)  # while still holding it: a waiting run re-opens the path and locks a new file
        except FileNotFoundError:
            pass
        os.close(fd)


_PARTIAL_RE = re.compile(r"\.partial-(\d+)-")


def _clean_leftovers(final_dir: Path, stage: str, keep: Path) -> None:
    """With the folder's lock held: remove temporary folders whose owner process is gone (a run killed outright:
    SIGKILL, power loss), and put back an earlier output a killed run had moved aside and not yet replaced."""
    for leftover in sorted(final_dir.parent.glob(f".{final_dir.name}.partial-*")):
        if leftover == keep:
            continue
        match = _PARTIAL_RE.search(leftover.name)
        owner = int(match.group(1)) if match else None
        if owner is not None and owner != os.getpid() and _pid_alive(owner):
            logger.info(f"[{stage}] leaving {leftover.name}: its owner, pid {owner}, is still running")
            continue
        logger.info(f"[{stage}] removing {leftover.name}, left by an interrupted run")
        shutil.rmtree(leftover, ignore_errors=True)
    for old in sorted(final_dir.parent.glob(f".{final_dir.name}.old-*")):
        if not final_dir.exists() and (old / METADATA).is_file():
            logger.info(f"[{stage}] restoring {final_dir.name} from {old.name}, moved aside by an interrupted run")
            os.replace(old, final_dir)
        else:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def stage_output(final_dir, stage: str, config: dict, seed: int):
    """Write a stage folder atomically, one run at a time.

    with stage_output(stage_dir("teacher"), "teacher", as_dict(cfg), cfg.SEED) as out:
        model.save_pretrained(out.dir); out.results["accuracy"] = ...

    In a multi-process run (torchrun) only the main process does this; every other process gets a throwaway
    temporary folder as `out.dir` (removed when the block ends), takes no lock and touches nothing under models/.
    """
    if not is_main_process():
        yield from _throwaway_output(final_dir, stage)
        return
    _, preamble = _handlers()
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:12]
    with folder_lock(final_dir, stage) as previous:
        tmp_dir = final_dir.parent / f".{final_dir.name}.partial-{os.getpid()}-{run_id}"
        tmp_dir.mkdir()
        with open(tmp_dir / LOG_FILE, "w") as f:  # what this run logged before the folder opened
            f.writelines(line + "\n" for line in preamble.lines)
        log_handler = logging.FileHandler(tmp_dir / LOG_FILE)
        log_handler.setFormatter(LOG_FORMAT)
        logger.addHandler(log_handler)
        preamble.open_folders += 1
        out = StageOutput(final_dir, tmp_dir, stage)
        started = time.time()
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        try:
            if previous.get("pid"):
                logger.info(f"[{stage}] taking over the lock of pid {previous['pid']} (no longer running)")
            _clean_leftovers(final_dir, stage, keep=tmp_dir)
            logger.info(f"[{stage}] writing {final_dir} (run {run_id}, seed {seed})")
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
                logger.info(f"[{stage}] replacing the earlier {final_dir.name}", extra=_BOOKKEEPING)
            os.replace(tmp_dir, final_dir)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            logger.info(f"[{stage}] done in {meta['wall_time_s']:.0f}s -> {final_dir}", extra=_BOOKKEEPING)
        except BaseException:
            logger.removeHandler(log_handler)
            log_handler.close()
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        finally:
            preamble.open_folders -= 1


def _throwaway_output(final_dir, stage: str):
    """stage_output for a process other than the main one: the same code runs, its writes go to a temporary folder
    that is removed afterwards (no lock, no metadata, no cleaning of anyone's leftovers)."""
    with tempfile.TemporaryDirectory(prefix=f"dpq-rank{process_rank()}-{Path(final_dir).name}-") as tmp:
        yield StageOutput(Path(final_dir), Path(tmp), stage)


def library_versions() -> dict:
    versions = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "accelerate", "bitsandbytes", "fvcore", "datasets"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return versions


def known_errors() -> tuple:
    """The project's own error types: each carries a one-line message that says what to do."""
    return (StageError, ConfigError, DataError, ExportError)


PROCESS_RECORDS_ENV = "DPQ_PROCESS_RECORDS"


def record_process_results(results) -> None:
    """With env DPQ_PROCESS_RECORDS=<folder>: each process writes what its `main()` returned to
    <folder>/rank<R>.json (rank, world size, results), to check that the processes of one run agree (tests)."""
    folder = os.environ.get(PROCESS_RECORDS_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        json_dump({"rank": process_rank(), "world_size": world_size(), "results": results},
                  Path(folder) / f"rank{process_rank()}.json")


def run_main(main) -> None:
    """Entry point for stage scripts: logging to the console from the start; the project's own errors
    (known_errors) exit 1 with their one-line message, no traceback; unexpected errors keep their traceback."""
    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"stopped by signal {signum}")

    setup_logging()
    signal.signal(signal.SIGTERM, interrupted)  # so a killed stage still removes its partial folder
    try:
        results = main()
        record_process_results(results)
    except KeyboardInterrupt as err:
        print(f"interrupted ({err or 'Ctrl-C'}): nothing was written over earlier outputs", file=sys.stderr)
        sys.exit(130)
    except known_errors() as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        sys.exit(1)
