"""Preemption and faults: signals sent to a real training process, a rank killed under
torchrun, a crash halfway through a checkpoint save, checkpoints damaged afterwards.

Every scenario ends with the weights of an uninterrupted run, bit for bit. The reference
runs and the resumed runs go in-process (``main(argv)``, one thread); the runs that receive
a signal or die are subprocesses (one thread too, so that the arithmetic is the same), and
the single-process ones start together to share their interpreter start-up.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitok_fast.checkpoint import CheckpointError
from vitok_fast.training import StopOnSignal, truncate_metrics

from _scripts import ROOT, load_script
STEPS = 12  # long enough that a signal sent after step 1 lands well before the end


stage1, stage2, dit = (load_script(f"train/{name}.py") for name in ("stage1", "stage2", "dit"))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _args(out, *extra, resume=""):
    return ["--smoke", "--no-kernels", "--num-workers", "0", "--lpips-weight", "0",
            "--max-steps", str(STEPS), "--log-every", "1", "--eval-every", "10000",
            "--out", str(out), "--resume", resume, *map(str, extra)]


def _weights(path):
    return load_file(Path(path) / "model.safetensors")


def _same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _rows(run):
    return [json.loads(line) for line in open(Path(run) / "metrics.jsonl")]


def _losses(run, key="train/loss"):
    return {r["step"]: r[key] for r in _rows(run) if key in r}


# PYTHONFAULTHANDLER: a worker that aborts (SIGABRT in C++) prints where Python was, in the log
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1",
       "PYTHONFAULTHANDLER": "1"}


class Run:
    """A training script in a subprocess, its output in files (a pipe could fill up)."""

    def __init__(self, script, out, args, env=None):
        self.out, self.log = Path(out), Path(str(out) + ".log")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "train" / f"{script}.py"),
                                          *args], stdout=log, stderr=subprocess.STDOUT,
                                         env={**ENV, **(env or {})}, cwd=ROOT)

    def logged_step(self) -> int:
        try:
            return max((r["step"] for r in _rows(self.out) if "train/loss" in r
                        or "train/loss_g" in r), default=0)
        except (FileNotFoundError, json.JSONDecodeError):
            return 0

    def output(self) -> str:
        return self.log.read_text().replace("\r", "\n")


def _signal_after_first_step(runs: dict, signals: dict, timeout=300):
    """Once a run has logged step 1, send it its signals in order (a string in the list:
    wait until the run has printed it); wait for all runs to exit."""
    pending, deadline = {k: list(v) for k, v in signals.items()}, time.time() + timeout
    while pending and time.time() < deadline:
        for name in list(pending):
            run, todo = runs[name], pending[name]
            if run.proc.poll() is not None:
                del pending[name]
            elif run.logged_step() >= 1:
                if isinstance(todo[0], str):
                    if todo[0] in run.output():
                        todo.pop(0)
                else:
                    run.proc.send_signal(todo.pop(0))
                if not todo:
                    del pending[name]
        time.sleep(0.02)
    for run in runs.values():
        run.proc.wait(timeout=max(10, deadline - time.time()))


def _kill_leftovers(runs: dict):
    for run in runs.values():
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted stage-1 run, checkpoints at steps 4, 8 and 12."""
    out = tmp_path_factory.mktemp("reference") / "run"
    stage1.main(_args(out, "--save-every", 4, "--keep", 5))
    return out


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """Stage-1 subprocesses started together: one per stop signal, one sent SIGINT twice,
    one killed halfway through its step-10 save."""
    tmp = tmp_path_factory.mktemp("stopped")
    runs = {name: Run("stage1", tmp / name, _args(tmp / name, "--save-every", 5))
            for name in ("SIGINT", "SIGTERM", "SIGUSR1")}
    for sig in ("SIGTERM", "SIGUSR1"):  # with data-loader workers (forked after arm())
        name = f"workers-{sig}"
        runs[name] = Run("stage1", tmp / name, _args(tmp / name, "--save-every", 5, *WORKERS))
    # Steps of 8 micro-batches: the second SIGINT lands while the first step is still running
    # (two SIGINTs sent back to back would merge into one pending signal).
    runs["twice"] = Run("stage1", tmp / "twice", _args(tmp / "twice", "--global-batch-size", 64,
                                                       "--micro-batch-size", 8))
    runs["crash"] = Run("stage1", tmp / "crash", _args(tmp / "crash", "--save-every", 5),
                        env={"VITOK_FAULT_KILL": "save:10"})
    try:
        _signal_after_first_step(runs, {"SIGINT": [signal.SIGINT], "SIGTERM": [signal.SIGTERM],
                                        "SIGUSR1": [signal.SIGUSR1],
                                        "workers-SIGTERM": [signal.SIGTERM],
                                        "workers-SIGUSR1": [signal.SIGUSR1],
                                        "twice": [signal.SIGINT, "SIGINT: finishing this step",
                                                  signal.SIGINT]})
    finally:
        _kill_leftovers(runs)
    return runs


WORKERS = ("--num-workers", 2)


@pytest.mark.slow(reason="starts 7 training processes (~1.5 min on 2 shared cores)")
@pytest.mark.parametrize("name,code", [("SIGINT", 130), ("SIGTERM", 143), ("SIGUSR1", 138),
                                       ("workers-SIGTERM", 143), ("workers-SIGUSR1", 138)])
def test_signal_finishes_the_step_saves_and_the_resume_is_bit_identical(stopped, reference,
                                                                        name, code):
    run = stopped[name]
    text = run.output()
    workers = WORKERS if name.startswith("workers") else ()  # the resume takes them too
    name = name.split("-")[-1]
    assert run.proc.returncode == code, text[-2000:]
    saved = sorted(p.name for p in run.out.glob("step_*"))
    assert len(saved) >= 1, text[-2000:]
    stop = int(saved[-1][5:])
    assert 1 <= stop < STEPS, saved  # it stopped early, after a whole step, and saved it
    assert f"stopped by {name} after step {stop}: checkpoint {run.out / saved[-1]}" in text
    command = text.split("to resume: ")[1].splitlines()[0]
    assert command.startswith("python train/stage1.py --smoke") and \
        command.endswith(f"--resume {run.out / saved[-1]}"), command
    assert max(_losses(run.out)) == stop  # the stop step was the last one trained and logged

    stage1.main(_args(run.out, "--save-every", 5, *workers, resume="auto"))
    # the reference read its samples without workers: the stream is the same with them,
    # from the start and from the stop's position
    assert _same_weights(run.out / f"step_{STEPS:08d}", reference / f"step_{STEPS:08d}")
    assert _losses(run.out) == _losses(reference)  # every step once, the same losses


def test_second_sigint_exits_at_once_without_a_checkpoint(stopped):
    run = stopped["twice"]
    text = run.output()
    assert run.proc.returncode == 130, text[-2000:]
    assert "second SIGINT: exiting now, without a checkpoint" in text
    assert "stopped by" not in text  # it did not get to finish the step and save
    assert not list(run.out.glob("step_*")) and not list(run.out.glob(".step_*"))


def test_crash_halfway_through_a_save_resumes_from_the_previous_checkpoint(stopped, reference,
                                                                           capsys):
    run = stopped["crash"]
    assert run.proc.returncode == -signal.SIGKILL, run.output()[-2000:]
    # Killed after the step-10 weights were written, before its train state: the write
    # stayed in a hidden temporary directory, and step 5 is the newest checkpoint.
    partial = list(run.out.glob(".step_00000010.*.tmp"))
    assert len(partial) == 1 and (partial[0] / "model.safetensors").is_file()
    assert not (partial[0] / "train_state.pt").exists()
    assert sorted(p.name for p in run.out.glob("step_*")) == ["step_00000005"]
    assert max(_losses(run.out)) == 10  # steps 6..10 were logged after that checkpoint

    stage1.main(_args(run.out, "--save-every", 5, resume="auto"))
    out = capsys.readouterr().out
    assert "resumed from" in out and "step_00000005 at step 5" in out
    assert "dropped 5 row(s) logged after step 5" in out  # steps 6..10, logged again
    assert not list(run.out.glob(".step_*"))  # the next save cleared the partial one
    assert _same_weights(run.out / f"step_{STEPS:08d}", reference / f"step_{STEPS:08d}")
    steps = [r["step"] for r in _rows(run.out) if "train/loss" in r]
    assert steps == list(range(1, STEPS + 1))  # each step once
    assert _losses(run.out) == _losses(reference)
    # TensorBoard's view: the rows of the dead run after step 5 are purged, not doubled.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run.out / "tb"))
    tb.Reload()
    events = tb.Scalars("train/loss")
    assert [e.step for e in events] == list(range(1, STEPS + 1))
    assert [e.value for e in events] == pytest.approx(
        [_losses(reference)[s] for s in range(1, STEPS + 1)], rel=1e-6)  # stored as float32


def test_metrics_truncation_keeps_rows_up_to_the_step_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "train/loss": 1.0 / (s + 1)} for s in (0, 1, 2, 3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "tra')
    assert truncate_metrics(path, 2) == 3  # steps 3, 4 and the torn line
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]
    assert truncate_metrics(path, 2) == 0
    assert truncate_metrics(path, 0) == 3 and path.read_text() == ""  # a fresh start


def test_finished_run_says_so_and_does_nothing(reference, capsys):
    before = (reference / "metrics.jsonl").read_bytes()
    out = stage1.main(_args(reference, "--save-every", 4, "--keep", 5, resume="auto"))
    assert out["step"] == STEPS and out["losses"] == []
    assert f"run already finished at step {STEPS} ({reference}); nothing to do" in \
        capsys.readouterr().out
    assert (reference / "metrics.jsonl").read_bytes() == before


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage,file", [(_truncate, "model.safetensors"),
                                         (_truncate, "train_state.pt"),
                                         (Path.unlink, "train_state.pt")])
def test_damaged_checkpoint_is_named_and_auto_falls_back_to_the_previous(tmp_path, reference,
                                                                        capsys, damage, file):
    run, last = tmp_path / "run", f"step_{STEPS:08d}"
    run.mkdir()
    for name in ("step_00000008", last):
        shutil.copytree(reference / name, run / name)
    shutil.copy(reference / "metrics.jsonl", run / "metrics.jsonl")
    bad = run / last / file
    damage(bad)

    with pytest.raises(CheckpointError) as e:  # asked for that checkpoint: no silent fallback
        stage1.main(_args(run, resume=str(run / last)))
    assert str(bad) in str(e.value) and "--resume auto" in str(e.value)
    with pytest.raises(CheckpointError, match=last):  # a run directory: its newest checkpoint
        stage1.main(_args(run, resume=str(run)))

    stage1.main(_args(run, resume="auto"))
    err = capsys.readouterr().err
    assert f"skipping {last}: {bad}" in err
    assert f"resuming from {run / 'step_00000008'}, the newest checkpoint that reads" in err
    assert _same_weights(run / last, reference / last)  # steps 9..12 again, saved whole
    assert _losses(run) == _losses(reference)


def test_stage2_sigterm_saves_and_the_resume_is_bit_identical_ema_included(tmp_path):
    stage1.main(_args(tmp_path / "s1", "--max-steps", 1))
    args = lambda out, resume="": _args(out, "--ckpt", tmp_path / "s1", "--save-every", 100,
                                        "--disc-warmup", 2, resume=resume)
    run = Run("stage2", tmp_path / "cut", args(tmp_path / "cut"))
    try:
        _signal_after_first_step({"cut": run}, {"cut": [signal.SIGTERM]})
    finally:
        _kill_leftovers({"cut": run})
    assert run.proc.returncode == 143, run.output()[-2000:]
    (saved,) = run.out.glob("step_*")
    assert "stopped by SIGTERM" in run.output() and int(saved.name[5:]) < STEPS

    stage2.main(args(run.out, resume="auto"))
    stage2.main(args(tmp_path / "full"))
    final = f"step_{STEPS:08d}"
    for sub in ("", "ema"):
        assert _same_weights(run.out / final / sub, tmp_path / "full" / final / sub), sub
    assert _losses(run.out, "train/loss_d") == _losses(tmp_path / "full", "train/loss_d")


def test_dit_sigusr1_saves_and_the_resume_is_bit_identical_ema_included(tmp_path):
    def args(out, resume=""):
        return ["--smoke", "--no-kernels", "--max-steps", str(STEPS), "--log-every", "1",
                "--save-every", "100", "--sample-every", "100000", "--out", str(out),
                "--resume", resume]

    run = Run("dit", tmp_path / "cut", args(tmp_path / "cut"))
    try:
        _signal_after_first_step({"cut": run}, {"cut": [signal.SIGUSR1]})
    finally:
        _kill_leftovers({"cut": run})
    assert run.proc.returncode == 138, run.output()[-2000:]
    (saved,) = run.out.glob("step_*")
    assert "stopped by SIGUSR1" in run.output() and int(saved.name[5:]) < STEPS

    dit.main(args(run.out, resume="auto"))
    dit.main(args(tmp_path / "full"))
    final = f"step_{STEPS:08d}"
    for sub in ("", "ema"):
        assert _same_weights(run.out / final / sub, tmp_path / "full" / final / sub), sub
    assert _losses(run.out) == _losses(tmp_path / "full")
    assert "already finished" in subprocess.run(  # a finished run says so and does nothing
        [sys.executable, str(ROOT / "train" / "dit.py"), *args(run.out, resume="auto")],
        capture_output=True, text=True, env=ENV, cwd=ROOT).stdout


STALL_TIMEOUT = 20  # --dist-timeout of the job whose rank 1 is stopped
TORCHRUN_STEPS = 6  # --max-steps of the torchrun jobs (the stopped one runs STEPS)


def _free_port():
    with socket.socket() as s:  # the kernel picks a free one; a race with another binder is
        s.bind(("127.0.0.1", 0))  # possible but unlikely within the second it takes
        return s.getsockname()[1]


class Job:
    """A torchrun job of 2 gloo ranks of stage 1 (``--resume auto``) in the background:
    ``static`` rendezvous (``--master_port``, what most users type), ``c10d``
    (``--standalone``), or ``nodes``: two agents on this machine as two nodes of one process
    each (c10d on 127.0.0.1). No environment variable beyond the thread count."""

    def __init__(self, out, kind="static", *extra, steps=TORCHRUN_STEPS, restarts=0, script="stage1",
                 args=None, launcher=(), log=None):
        self.out, self.log = Path(out), Path(log or str(out) + ".log")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        nodes = {"static": [["--nproc-per-node", "2", "--master-port", str(port)]],
                 "c10d": [["--standalone", "--nproc-per-node", "2"]],
                 "nodes": [["--nnodes", "2", "--node-rank", str(n), "--nproc-per-node", "1",
                            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                            "--rdzv-id", self.out.name] for n in (0, 1)]}[kind]
        if args is None:
            args = _args(out, "--max-steps", steps, "--save-every", 2, "--device", "cpu",
                         resume="auto")
        log = open(self.log, "w")
        self.agents = [subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *node, *launcher, "--max-restarts",
             str(restarts), str(ROOT / "train" / f"{script}.py"), *args, *map(str, extra)],
            stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT) for node in nodes]

    def worker(self, rank):
        """The pid of the worker of ``rank`` (from /proc: its RANK variable), or None."""
        for agent in self.agents:
            try:
                children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text()
                for child in children.split():
                    environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                    if f"RANK={rank}".encode() in environ:
                        return int(child)
            except (FileNotFoundError, ProcessLookupError):
                pass
        return None

    def signal(self, rank, sig):
        pid = self.worker(rank)
        if pid is not None:
            os.kill(pid, sig)
        return pid is not None

    def done(self):
        return all(a.poll() is not None for a in self.agents)

    @property
    def returncodes(self):
        return [a.returncode for a in self.agents]

    def text(self):
        return self.log.read_text().replace("\r", "\n")

    def logged(self):
        return max(_losses_or_empty(self.out), default=0)

    def stop(self):
        """Kill what is left (a SIGSTOPped worker, a job past the deadline)."""
        for rank in (0, 1):
            self.signal(rank, signal.SIGKILL)
        for agent in self.agents:
            try:
                agent.wait(timeout=60)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()


def _kill_while_saving(job, rank):
    """SIGKILL the worker of ``rank`` as soon as a checkpoint's hidden temporary directory
    appears. A save takes milliseconds, which the main poll could miss: a thread polls the
    run directory every half millisecond instead, with the pid looked up beforehand."""
    job.killed_saving = False

    def watch():
        pid = None
        while not job.done():
            if pid is None:
                pid = job.worker(rank)
                time.sleep(0.05)
                continue
            names = os.listdir(job.out) if job.out.is_dir() else []
            if any(n.startswith(".step_") for n in names):
                os.kill(pid, signal.SIGKILL)
                job.killed_saving = True
                return
            time.sleep(0.0005)

    threading.Thread(target=watch, daemon=True).start()


def _drive(jobs: dict, triggers: dict, timeout=420):
    """Poll the jobs; a trigger is a list of (condition(job), action(job)) pairs, each
    fired once and in order. Returns when every job has ended (or at the deadline)."""
    pending, deadline = {k: list(v) for k, v in triggers.items()}, time.time() + timeout
    while time.time() < deadline and not all(j.done() for j in jobs.values()):
        for name, todo in pending.items():
            if todo and todo[0][0](jobs[name]) and todo[0][1](jobs[name]) is not False:
                todo.pop(0)
        time.sleep(0.02)
    return {name: not todo for name, todo in pending.items()}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """torchrun jobs started together: a reference; ranks SIGKILLed from outside at several
    moments under static and c10d rendezvous and on two nodes (one restart each); SIGTERM to
    one rank of an FSDP2 job and SIGUSR1 to torchrun running train/dit.py (each with its
    reference, then resumed); a rank stopped (SIGSTOP) under a 20-second --dist-timeout."""
    tmp = tmp_path_factory.mktemp("cluster")
    jobs = {"full": Job(tmp / "full", "c10d"),
            # a step's forward/backward/all-reduce: after step 3 was logged, ckpt 2 the newest
            "static-step": Job(tmp / "static-step", "static", restarts=1),
            # rank 0 while it writes a checkpoint (a hidden .step_*.tmp directory exists)
            "c10d-save": Job(tmp / "c10d-save", "c10d", restarts=1),
            # set-up and the first batches: rank 0 printed its start line, no step logged yet
            "static-setup": Job(tmp / "static-setup", "static", restarts=1),
            # the worker of node 1 after step 4 was logged: both nodes restart
            "nodes": Job(tmp / "nodes", "nodes", restarts=1),
            # SIGTERM to one rank of an FSDP2 job; then the job resumed
            "one": Job(tmp / "one", "static", "--parallel", "fsdp"),
            "fsdp-full": Job(tmp / "fsdp-full", "c10d", "--parallel", "fsdp"),
            # SIGUSR1 to torchrun itself (SLURM's warning), forwarded to train/dit.py's ranks
            "dit": Job(tmp / "dit", "static", script="dit", args=_dit_args(tmp / "dit"),
                       launcher=["--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"]),
            "dit-full": Job(tmp / "dit-full", "c10d", script="dit",
                            args=_dit_args(tmp / "dit-full")),
            "stall": Job(tmp / "stall", "static", "--dist-timeout", STALL_TIMEOUT, steps=STEPS)}
    kill = lambda rank: lambda job: job.signal(rank, signal.SIGKILL)
    _kill_while_saving(jobs["c10d-save"], 0)
    jobs["stall"].stopped_at = None

    def stall(job):
        job.stopped_at = time.time()
        return job.signal(1, signal.SIGSTOP)

    try:
        fired = _drive(jobs, {
            "static-step": [(lambda j: j.logged() >= 3, kill(1))],
            "c10d-save": [(lambda j: j.killed_saving, lambda j: None)],
            "static-setup": [(lambda j: "fresh start" in j.text(), kill(0))],
            "nodes": [(lambda j: j.logged() >= 4, kill(1))],
            "one": [(lambda j: j.logged() >= 1, lambda j: j.signal(1, signal.SIGTERM))],
            "dit": [(lambda j: j.logged() >= 1,
                     lambda j: j.agents[0].send_signal(signal.SIGUSR1))],
            "stall": [(lambda j: j.logged() >= 1, stall),
                      (lambda j: j.worker(0) is None,
                       lambda j: setattr(j, "rank0_gone", time.time()))]})
        # the stopped FSDP and DiT jobs, resumed by the same commands
        more = {"one-resumed": Job(tmp / "one", "static", "--parallel", "fsdp",
                                   log=tmp / "one-resumed.log"),
                "dit-resumed": Job(tmp / "dit", "static", script="dit",
                                   args=_dit_args(tmp / "dit"), log=tmp / "dit-resumed.log")}
        jobs.update(more)
        _drive(more, {})
    finally:
        for job in jobs.values():
            job.stop()
    return jobs, fired


def _dit_args(out):
    return ["--smoke", "--no-kernels", "--max-steps", str(TORCHRUN_STEPS), "--log-every", "1",
            "--save-every", "100", "--sample-every", "100000", "--device", "cpu",
            "--out-dir", str(out), "--resume", "auto"]




@pytest.mark.slow(reason="eleven torchrun jobs of 2 gloo ranks, four restarted (~3 min)")
@pytest.mark.parametrize("name", ["static-step", "c10d-save", "static-setup", "nodes"])
def test_a_rank_killed_from_outside_restarts_under_torchrun_and_ends_bit_identical(cluster,
                                                                                   name):
    jobs, fired = cluster
    job, full = jobs[name], jobs["full"]
    text = job.text()
    assert fired[name], text[-3000:]  # the kill was sent
    assert full.returncodes == [0], full.text()[-3000:]
    assert job.returncodes == [0] * len(job.agents), text[-3000:]
    starts = re.findall(r"(fresh start|resumed from \S+ at step \d+)", text)
    assert len(starts) == 2, starts  # the killed attempt and the restarted one
    assert "Connection refused" not in text and "connectFullMesh" not in text
    final = f"step_{TORCHRUN_STEPS:08d}"
    assert _same_weights(job.out / final, full.out / final)
    steps = [r["step"] for r in _rows(job.out) if "train/loss" in r]
    assert steps == list(range(1, TORCHRUN_STEPS + 1))  # each step logged once
    assert _losses(job.out) == _losses(full.out)
    if name == "nodes":  # ranks 0 and 1 on two agents: one process each
        assert text.count("fresh start") + text.count("resumed from") == 2


@pytest.mark.slow(reason="shares the torchrun jobs above")
def test_fsdp_a_signal_to_one_rank_stops_both_after_the_same_step_and_resumes_exactly(cluster):
    jobs, fired = cluster
    job = jobs["one"]
    text = job.text()
    assert fired["one"], text[-3000:]
    # Both ranks stopped after the same step k: the save is a collective, so a rank that went
    # on would have left the other waiting (the hang this test caught once). Rank 1 exits
    # 143; torchrun then sends rank 0, done and on its way out, a SIGTERM of its own.
    (k,) = {int(m) for m in re.findall(r"stopped by SIGTERM after step (\d+)", text)}
    assert 1 <= k < TORCHRUN_STEPS, text[-3000:]
    assert re.search(r"rank *: 1 .*\n *exitcode *: 143", text), text[-3000:]
    resumed, full = jobs["one-resumed"], jobs["fsdp-full"]
    assert resumed.returncodes == [0] and full.returncodes == [0], resumed.text()[-3000:]
    # the checkpoint of step k was whole: the same command resumed from it
    assert f"resumed from {job.out / f'step_{k:08d}'} at step {k}" in resumed.text()
    final = f"step_{TORCHRUN_STEPS:08d}"
    assert _same_weights(job.out / final, full.out / final)  # FSDP's gathered weights
    assert _losses(job.out) == _losses(full.out)


@pytest.mark.slow(reason="shares the torchrun jobs above")
def test_dit_under_torchrun_sigusr1_saves_and_resumes_bit_identical_ema_included(cluster):
    jobs, fired = cluster
    job, resumed, full = jobs["dit"], jobs["dit-resumed"], jobs["dit-full"]
    text = job.text()
    assert fired["dit"], text[-3000:]
    (k,) = {int(m) for m in re.findall(r"stopped by SIGUSR1 after step (\d+)", text)}
    assert 1 <= k < TORCHRUN_STEPS, text[-3000:]
    # torchrun forwards the signal to its workers, waits for them (they save) and exits 1
    assert job.returncodes == [1] and f"got signal: {int(signal.SIGUSR1)}" in text
    assert resumed.returncodes == [0] and full.returncodes == [0], resumed.text()[-3000:]
    assert f"resumed from {job.out / f'step_{k:08d}'} at step {k}" in resumed.text()
    final = f"step_{TORCHRUN_STEPS:08d}"
    for sub in ("", "ema"):
        assert _same_weights(job.out / final / sub, full.out / final / sub), sub
    assert _losses(job.out) == _losses(full.out)


@pytest.mark.slow(reason="shares the torchrun jobs above")
def test_a_silent_peer_makes_the_other_rank_exit_within_the_timeout(cluster):
    jobs, fired = cluster
    job = jobs["stall"]
    text = job.text()
    assert fired["stall"], text[-3000:]  # rank 1 stopped, then rank 0 exited
    waited = job.rank0_gone - job.stopped_at
    # Rank 0 waited in a collective for the stopped rank 1 and gave up after the timeout
    # (plus the poll and a loaded machine's slack), not before.
    print(f"rank 0 exited {waited:.1f} s after rank 1 was stopped")
    assert 0.8 * STALL_TIMEOUT <= waited <= STALL_TIMEOUT + 30, waited
    (line,) = [l for l in text.splitlines() if "lost contact" in l]
    step = int(re.search(r"error: rank 0 lost contact with the other ranks in step (\d+) ",
                         line).group(1))
    assert 2 <= step <= STEPS, line
    assert "torchrun --max-restarts" in line
    assert job.returncodes != [0]


def _losses_or_empty(run):
    try:
        return _losses(run)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_stop_on_signal_sets_a_flag_only_while_armed_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with StopOnSignal() as stop:
        assert signal.getsignal(signal.SIGUSR1) is before  # not armed: set-up dies as usual
        stop.arm()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)  # Python runs the handler at the next bytecode boundary
        assert stop.requested and not stop.stopped
        assert stop.agreed(torch.device("cpu")) and stop.stopped
        assert stop.exit_code == 138
        with pytest.raises(SystemExit) as e:
            stop.exit(3, "ckpt", "python train/x.py --resume ckpt")
        assert e.value.code == 138
    assert signal.getsignal(signal.SIGUSR1) is before


def test_resume_auto_with_no_readable_checkpoint_stops_instead_of_starting_over(tmp_path):
    from vitok_fast import ViTok
    from vitok_fast.checkpoint import load_resume, save_checkpoint

    model = ViTok.from_name("T-T/8", use_kernels=False)
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model, {"step": step})
    _truncate(tmp_path / "step_00000002" / "train_state.pt")
    logged = []
    path, state = load_resume("auto", tmp_path, log=logged.append)
    assert path.name == "step_00000001" and state["step"] == 1
    assert len(logged) == 2 and "step_00000002/train_state.pt does not read" in logged[0]
    (tmp_path / "step_00000001" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint in .* reads .*--resume ''"):
        load_resume("auto", tmp_path, log=logged.append)
    assert load_resume("", tmp_path) == (None, None)


def test_a_restarted_attempt_ignores_the_dead_attempts_store_announcement(monkeypatch):
    """torchrun's store still holds the announcement of a dead attempt's rank 0 (a port where
    nothing listens any more); rank 1 of the new attempt, started before the new rank 0,
    must wait for the new announcement instead of using the old one."""
    import datetime

    import torch.distributed as dist

    from vitok_fast import distributed as D

    agent = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    dead = _free_port()  # nothing listens there: the dead attempt's rank 0 is gone
    agent.set(D._ATTEMPT_KEY, f"127.0.0.1:{dead}:{'0' * 32}")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(agent.port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # workers are its clients
    timeout = datetime.timedelta(seconds=30)
    stores = {}
    rank1 = threading.Thread(target=lambda: stores.update({1: D.attempt_store(1, 2, timeout)}))
    rank1.start()
    time.sleep(0.5)  # rank 1 has read the stale announcement by now, and retries
    assert 1 not in stores
    stores[0] = D.attempt_store(0, 2, timeout)
    rank1.join(timeout=30)
    assert stores[1].port == stores[0].port != dead
    stores[0].set("hello", "from rank 0")  # one store: what rank 0 writes, rank 1 reads
    assert stores[1].get("hello") == b"from rank 0"
    assert agent.get(D._ATTEMPT_KEY).decode().split(":")[1] == str(stores[0].port)
    assert not stores[0].libuvBackend  # the classic server: it always joins its thread
    D.cleanup()  # no process group here: releases the kept store
    assert not D._STORE
