"""Run a preset's stage graph: inline (one stage after another, in this process), locally in parallel, or on SLURM.

The local and SLURM launchers submit each stage as a submitit job. What is done is decided by each stage's own
`done` check, the single source of truth: a rerun after a failure, a kill or a pre-emption submits only the stages
still to run (and those downstream of them). The jobs of a preset and their logs are listed in `<folder>/jobs.json`,
which `--status` reads.
"""

import fcntl
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
import torch

from trajrep.errors import TrajrepError

LAUNCHERS = ("inline", "local", "slurm")
# SLURM states of a job that will still run (or is running): its stage is not submitted again.
SLURM_ALIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "CONFIGURING", "COMPLETING",
               "RESIZING", "SUSPENDED", "READY"}
# A job sacct does not list (UNKNOWN) counts as alive this long after its submission (sacct may not have seen it
# yet); after that its record is taken to be gone (accounting off or purged) and the stage is submitted again.
UNKNOWN_GRACE_S = 600
POLL_S = 1.0


@dataclass
class Stage:
    """One job of a preset: `name` is `kind/target` (its line in --status, its job name); it starts once every
    stage in `needs` is done; `done` says whether its output is already there; `work` makes it."""

    name: str
    needs: list[str]
    done: Callable[[], bool]
    work: Callable[[], Any]

    @property
    def kind(self) -> str:
        return self.name.split("/", 1)[0]


@dataclass
class Resources:
    """What one kind of stage asks a cluster for. SLURM reads every field; the local launcher gives a stage with
    `gpus` that many GPUs of its own (at most the machine's) where there are GPUs, and stops a job after
    `time_min`."""

    gpus: int | None = None
    cpus: int | None = None
    mem_gb: int | None = None
    time_min: int | None = None
    partition: str | None = None
    slurm_args: dict[str, str] = field(default_factory=dict)  # more sbatch options, e.g. {"account": "lab"}

    def over(self, default: "Resources") -> "Resources":
        """These resources, each unset field taken from `default`."""
        merged = {key: getattr(self, key) if getattr(self, key) is not None else getattr(default, key)
                  for key in ("gpus", "cpus", "mem_gb", "time_min", "partition")}
        return Resources(**merged, slurm_args={**default.slurm_args, **self.slurm_args})


DEFAULT_RESOURCES = {
    "pretrain": Resources(gpus=1, cpus=8, time_min=48 * 60),
    "untrained": Resources(gpus=0, cpus=2, time_min=30),
    "cache": Resources(gpus=1, cpus=8, time_min=4 * 60),
    "probe": Resources(gpus=1, cpus=8, time_min=24 * 60),
    "report": Resources(gpus=0, cpus=2, time_min=30),
}


class StageJob(submitit.helpers.Checkpointable):
    """One stage as a submitit job. Checkpointable, so submitit requeues it on a time-out or pre-emption; the stage
    then goes on from what it left (a pretraining run resumes from its last checkpoint)."""

    def __init__(self, run_stage: Callable[[str], Any]) -> None:
        self.run_stage = run_stage

    def __call__(self, stage: str) -> None:
        self.run_stage(stage)


def to_run(stages: list[Stage]) -> list[Stage]:
    """The stages that are not done, and every stage downstream of one of them (a pretraining run done again
    removes the records built from its earlier checkpoint, so what reads it must be checked again after it).
    Stages come after what they need, so one pass carries this through the whole graph."""
    chosen: set[str] = set()
    for stage in stages:
        if any(need in chosen for need in stage.needs) or not stage.done():
            chosen.add(stage.name)
    return [stage for stage in stages if stage.name in chosen]


def run_inline(stages: list[Stage]) -> None:
    """Every stage that is not done, one after another in this process, each checked again when its turn comes."""
    todo = to_run(stages)
    print(f"trajrep: {len(stages) - len(todo)} of {len(stages)} stages are done; {len(todo)} to check and run",
          flush=True)
    for stage in todo:
        if not stage.done():
            stage.work()


class Registry:
    """`jobs.json` in the launcher's folder: each submitted stage's launcher, job id, log files, submission time
    and, once a local job ended, its outcome. `jobs.lock` is held by the local launcher while it runs."""

    def __init__(self, folder: Path) -> None:
        self.path, self.lock_path = folder / "jobs.json", folder / "jobs.lock"
        self.jobs: dict[str, dict] = json.loads(self.path.read_text())["jobs"] if self.path.exists() else {}
        self.launcher_pid: int | None = None

    def add(self, stage: str, launcher: str, job: submitit.Job | None, save: bool = True) -> None:
        entry = {"launcher": launcher, "job_id": None}
        if job is not None:
            entry.update(job_id=job.job_id, stdout=str(job.paths.stdout), stderr=str(job.paths.stderr),
                         submitted=time.time())
        self.jobs[stage] = entry
        if save:
            self.save()

    def ended(self, stage: str, succeeded: bool) -> None:
        self.jobs[stage]["outcome"] = "succeeded" if succeeded else "failed"
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        unfinished = self.path.with_suffix(".partial")
        unfinished.write_text(json.dumps({"launcher_pid": self.launcher_pid, "jobs": self.jobs}, indent=1))
        unfinished.replace(self.path)

    @contextmanager
    def held(self) -> Iterator[None]:
        """The launcher's lock, or a clear error when another local launcher of this preset holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = json.loads(self.path.read_text()).get("launcher_pid") if self.path.exists() else None
                raise TrajrepError(f"a local launcher of this preset is already running (pid {other}); wait for it "
                                   "or stop it, then run again") from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def launcher_running(self) -> bool:
        """Whether a local launcher holds this preset's lock now."""
        if not self.lock_path.exists():
            return False
        with open(self.lock_path, "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False

    def local_jobs_alive(self, stages: list[Stage]) -> list[str]:
        """Those of `stages` whose local job from an earlier launcher still runs (a launcher killed with SIGKILL
        leaves its jobs running)."""
        return [f"{stage.name} (pid {entry['job_id']})" for stage in stages
                if (entry := self.jobs.get(stage.name, {})).get("launcher") == "local" and entry.get("job_id")
                and "outcome" not in entry and _alive(int(entry["job_id"]))]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_local(stages: list[Stage], run_stage: Callable[[str], Any], folder: Path, jobs: int,
              resources: Callable[[str], Resources]) -> list[str]:
    """Up to `jobs` stages at once, each a local submitit job, each submitted once every stage it needs is done;
    where the machine has GPUs, a stage that asks for GPUs waits until that many are free and gets them to itself.
    Returns the names of the stages that failed or could not start. A launcher stopped by Ctrl-C or SIGTERM stops
    its jobs."""
    registry = Registry(folder)
    with registry.held():
        todo = to_run(stages)
        still_running = registry.local_jobs_alive(todo)
        if still_running:
            raise TrajrepError(f"{len(still_running)} stage(s) still run as jobs of an earlier launcher: "
                               f"{', '.join(still_running[:3])}; wait for them or kill them, then run again")
        print(f"trajrep: {len(stages) - len(todo)} of {len(stages)} stages are done; {len(todo)} to run, up to "
              f"{jobs} at once (logs: {folder})", flush=True)
        registry.launcher_pid = os.getpid()
        for stage in todo:
            registry.add(stage.name, "local", None, save=False)
        registry.save()
        finished = {stage.name for stage in stages} - {stage.name for stage in todo}
        return _run_jobs(todo, finished, run_stage, folder, jobs, resources, registry)


def _run_jobs(todo: list[Stage], finished: set[str], run_stage: Callable[[str], Any], folder: Path, jobs: int,
              resources: Callable[[str], Resources], registry: Registry) -> list[str]:
    """run_local's loop: start what is ready, collect what ended, until nothing is left."""
    failed: list[str] = []
    free_gpus = _gpu_ids()
    gpu_count = len(free_gpus)
    running: dict[str, tuple[submitit.Job, list[int]]] = {}
    executor = submitit.LocalExecutor(folder=folder)
    stop_on_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        while todo or running:
            for name, (job, gpus) in list(running.items()):
                if job.done():
                    del running[name]
                    free_gpus += gpus
                    succeeded = _succeeded(job, name)
                    registry.ended(name, succeeded)
                    (finished.add if succeeded else failed.append)(name)
            for stage in list(todo):  # in graph order, so a failure reaches everything downstream in one pass
                if any(need in failed for need in stage.needs):
                    todo.remove(stage)
                    failed.append(stage.name)
                    print(f"trajrep: {stage.name} not run: a stage it needs failed", flush=True)
            waiting_for_gpus = False
            for stage in [s for s in todo if all(need in finished for need in s.needs)]:
                if len(running) >= jobs:
                    break
                want = resources(stage.kind)
                wanted_gpus = min(want.gpus or 0, gpu_count)
                if wanted_gpus and (waiting_for_gpus or len(free_gpus) < wanted_gpus):
                    waiting_for_gpus = True  # the first stage that waits gets the next free GPUs
                    continue
                todo.remove(stage)
                if stage.done():  # made meanwhile, e.g. a cache a stage before it built
                    finished.add(stage.name)
                    continue
                gpus, free_gpus = free_gpus[:wanted_gpus], free_gpus[wanted_gpus:]
                executor.update_parameters(timeout_min=want.time_min, gpus_per_node=len(gpus), visible_gpus=gpus,
                                           name=stage.name)
                job = executor.submit(StageJob(run_stage), stage.name)
                running[stage.name] = (job, gpus)
                registry.add(stage.name, "local", job)
                print(f"trajrep: started {stage.name} (job {job.job_id}; {len(finished)} done, {len(running)} "
                      f"running, {len(todo)} waiting)", flush=True)
            time.sleep(POLL_S)
    finally:
        signal.signal(signal.SIGTERM, stop_on_sigterm)
        for job, _gpus in running.values():  # a stopped launcher leaves no job behind
            job.cancel(check=False)
        registry.launcher_pid = None
        registry.save()
    return failed


def _gpu_ids() -> list[int]:
    """The GPUs this process may hand out, as the ids its children must use: CUDA_VISIBLE_DEVICES's, when set."""
    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(range(count))
    ids = [entry.strip() for entry in visible.split(",") if entry.strip()]
    if not all(entry.isdigit() for entry in ids):
        raise TrajrepError(f"CUDA_VISIBLE_DEVICES={visible} names GPUs by UUID; the local launcher hands out GPU "
                           "indices: set it to indices (e.g. 0,1)")
    return [int(entry) for entry in ids][:count]


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM as SystemExit, so that the launcher's `finally` stops its jobs (by default it would just die)."""
    raise SystemExit(128 + signum)


def _succeeded(job: submitit.Job, name: str) -> bool:
    """Whether a finished local job returned; prints where to read why not."""
    try:
        if not job.paths.result_pickle.exists():  # killed: no result will come (result() would wait for one)
            raise RuntimeError("no result")
        job.result()
    except Exception:  # submitit re-raises the job's exception, or says it ended without a result
        print(f"trajrep: {name} failed: {_last_line(_tail(job.paths.stderr))} (log: {job.paths.stderr})",
              flush=True)
        return False
    print(f"trajrep: {name} done", flush=True)
    return True


def submit_slurm(stages: list[Stage], run_stage: Callable[[str], Any], folder: Path, group: str,
                 resources: Callable[[str], Resources]) -> dict[str, str]:
    """Submit every stage still to run as a SLURM job that starts once its inputs' jobs succeeded (afterok); a
    stage whose earlier job is still queued or running is not submitted again, unless a stage it needs is (the
    old job would wait on the old input: it is cancelled). Returns stage -> job id."""
    registry = Registry(folder)
    _slurm_executor(folder)  # fails early, with what to do, where there is no SLURM
    todo = to_run(stages)
    states = _slurm_states(folder, {stage.name: registry.jobs.get(stage.name, {}) for stage in todo})
    ids: dict[str, str] = {}
    resubmitted: set[str] = set()
    for stage in todo:
        earlier = registry.jobs.get(stage.name, {})
        if states.get(stage.name) in SLURM_ALIVE:
            if not any(need in resubmitted for need in stage.needs):
                ids[stage.name] = earlier["job_id"]
                continue
            submitit.SlurmJob(folder=folder, job_id=earlier["job_id"]).cancel(check=False)
        want = resources(stage.kind)
        extra = dict(want.slurm_args)
        waits = [ids[need] for need in stage.needs if need in ids]
        if waits:
            extra.update(dependency="afterok:" + ":".join(waits), kill_on_invalid_dep="yes")
        parameters = {"job_name": f"{group}:{stage.name}", "time": want.time_min, "cpus_per_task": want.cpus,
                      "gpus_per_node": want.gpus or None, "partition": want.partition,
                      "mem": f"{want.mem_gb}GB" if want.mem_gb else None, "additional_parameters": extra}
        executor = _slurm_executor(folder)  # a fresh one: update_parameters merges, so one stage's GPUs would stay
        executor.update_parameters(**{key: value for key, value in parameters.items() if value is not None})
        job = executor.submit(StageJob(run_stage), stage.name)
        registry.add(stage.name, "slurm", job, save=False)
        ids[stage.name] = job.job_id
        resubmitted.add(stage.name)
    registry.save()
    print(f"trajrep: {len(stages) - len(todo)} of {len(stages)} stages are done; submitted {len(resubmitted)} jobs "
          f"to SLURM, {len(todo) - len(resubmitted)} still queued or running from before (logs: {folder}); see "
          "them with --status", flush=True)
    return ids


def _slurm_executor(folder: Path) -> submitit.SlurmExecutor:
    try:
        return submitit.SlurmExecutor(folder=folder)
    except RuntimeError:  # submitit looks for srun
        raise TrajrepError("--launcher slurm needs a SLURM cluster, and srun is not on PATH here; on one machine "
                           "use --launcher local --jobs N") from None


def _slurm_states(folder: Path, entries: dict[str, dict]) -> dict[str, str]:
    """The SLURM state of each stage's job (of the entries that are SLURM jobs), from one sacct call. A job
    sacct does not list is PENDING for UNKNOWN_GRACE_S after its submission (sacct may not know it yet), then
    UNKNOWN, which is not alive."""
    jobs = {stage: entry for stage, entry in entries.items() if entry.get("launcher") == "slurm"}
    if not jobs:
        return {}
    watcher = submitit.SlurmJob.watcher  # shared by all jobs: one sacct call covers every registered id
    for entry in jobs.values():
        watcher.register_job(str(entry["job_id"]))
    watcher.update()
    states = {}
    for stage, entry in jobs.items():
        state = watcher.get_state(str(entry["job_id"]), mode="cache").split()[0]  # "CANCELLED by 0" -> CANCELLED
        recent = time.time() - entry.get("submitted", 0) < UNKNOWN_GRACE_S
        states[stage] = "PENDING" if state == "UNKNOWN" and recent else state
    return states


def status(stages: list[Stage], folder: Path) -> list[tuple[str, str, str]]:
    """Every stage as (name, state, detail): done; running, queued (with the job id and log); finished (its job
    succeeded but its output is not complete yet: a cache, which counts as done once its run's probes are
    recorded); failed (with the last line of its log); or to run (never submitted)."""
    registry = Registry(folder)
    launcher_running = registry.launcher_running()
    slurm = _slurm_states(folder, registry.jobs)
    rows = []
    for stage in stages:
        entry = registry.jobs.get(stage.name)
        if stage.done():
            rows.append((stage.name, "done", ""))
        elif entry is None:
            rows.append((stage.name, "to run", ""))
        elif entry["job_id"] is None:
            rows.append((stage.name, "queued" if launcher_running else "to run", ""))
        else:
            state = _job_state(entry, slurm.get(stage.name))
            log = entry["stderr"]
            detail = f"job {entry['job_id']}, log {log}"
            if state == "failed":
                detail += f": {_last_line(_tail(Path(log)))}"
            rows.append((stage.name, state, detail))
    return rows


def _job_state(entry: dict, slurm_state: str | None) -> str:
    """running, queued, finished or failed: the state of a submitted stage that is not done."""
    if entry["launcher"] == "slurm":
        return ("running" if slurm_state == "RUNNING" else "queued" if slurm_state in SLURM_ALIVE
                else "finished" if slurm_state == "COMPLETED" else "failed")
    if "outcome" in entry:
        return "finished" if entry["outcome"] == "succeeded" else "failed"
    return "running" if _alive(int(entry["job_id"])) else "failed"


def _tail(path: Path, size: int = 4096) -> str:
    if not path.exists():
        return f"(no log at {path})"
    with path.open("rb") as log:
        log.seek(max(0, path.stat().st_size - size))
        return log.read().decode(errors="replace")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(empty log)"


def print_status(stages: list[Stage], folder: Path) -> None:
    """One line per stage (`status`), then how many stages are in each state."""
    rows = status(stages, folder)
    width = max(len(name) for name, _, _ in rows)
    for name, state, detail in rows:
        print(f"{name:<{width}}  {state:<8} {detail}".rstrip())
    counts = {state: sum(row[1] == state for row in rows)
              for state in ("done", "running", "queued", "finished", "failed", "to run")}
    print(", ".join(f"{count} {state}" for state, count in counts.items() if count))


def print_graph(stages: list[Stage], resources: Callable[[str], Resources], launcher: str) -> None:
    """The stages still to run, each with what it waits for and (for SLURM) what it asks for; submits nothing."""
    todo = to_run(stages)
    names = {stage.name for stage in todo}
    width = max((len(name) for name in names), default=0)
    for stage in todo:
        needs = [need for need in stage.needs if need in names]
        waits = "-" if not needs else ", ".join(needs) if len(needs) <= 3 else f"{len(needs)} stages"
        line = f"{stage.name:<{width}}  needs: {waits}"
        if launcher == "slurm":
            want = resources(stage.kind)
            line += (f"  [gpus {want.gpus}, cpus {want.cpus}, {want.time_min} min"
                     + (f", {want.mem_gb} GB" if want.mem_gb else "")
                     + (f", partition {want.partition}" if want.partition else "") + "]")
        print(line)
    print(f"{len(stages) - len(todo)} of {len(stages)} stages are done; {len(todo)} would be "
          f"{'run' if launcher == 'inline' else 'submitted'} ({launcher} launcher; dry run, nothing started)")


def check_launch(launcher: str, jobs: int) -> None:
    """Fail, saying what to change, on a launcher that does not exist or --jobs it cannot use."""
    if launcher not in LAUNCHERS:
        raise TrajrepError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    if jobs < 1:
        raise TrajrepError(f"--jobs must be at least 1, got {jobs}")
    if jobs > 1 and launcher != "local":
        raise TrajrepError(f"--jobs {jobs} runs stages in parallel on this machine: it needs --launcher local")


def resources_for(preset_resources: dict[str, Resources]) -> Callable[[str], Resources]:
    """A stage kind's resources: the preset's, each unset field from trajrep's default for that kind."""
    unknown = sorted(set(preset_resources) - set(DEFAULT_RESOURCES))
    if unknown:
        raise TrajrepError(f"resources are set for unknown stage kind(s) {', '.join(unknown)}; the kinds are "
                           f"{', '.join(DEFAULT_RESOURCES)}")
    return lambda kind: preset_resources.get(kind, Resources()).over(DEFAULT_RESOURCES[kind])

