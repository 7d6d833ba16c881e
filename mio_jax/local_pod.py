"""A pod rehearsed on one machine: N JAX processes on 127.0.0.1, D CPU devices each, all
running the command given after the flags (and ``--``).

Every process gets the environment contract ``mio_jax.main`` reads on a real pod or
cluster (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), plus
``JAX_PLATFORMS=cpu`` and ``XLA_FLAGS=--xla_force_host_platform_device_count=D``; jax's
CPU collectives (gloo) then run across the processes as they would across hosts.

  python -m mio_jax.local_pod --num_processes=2 --devices_per_process=4 -- \\
      python -m mio_jax.main --config=configs/default.py --workdir=workdirs/pod2

Each process's output goes to ``<log_dir>/process_<i>.log``. When one process fails or the
time limit passes, every process still running is killed and all logs are shown: a pod
whose hosts disagree hangs in a collective instead of failing, and this turns that into an
error that names the process.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable, Mapping, Sequence

from absl import flags

from mio_jax import cli, errors

FLAGS = flags.FlagValues()
FLAGS.set_gnu_getopt(False)  # the flags come first: from the command on, nothing is ours
flags.DEFINE_integer("num_processes", None, "N, processes of the pod", lower_bound=1,
                     flag_values=FLAGS, required=True)
flags.DEFINE_integer("devices_per_process", 1, "D, simulated CPU devices of each process",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_float("timeout", 24 * 3600.0, "seconds before every process still running is "
                   "killed", flag_values=FLAGS)
flags.DEFINE_string("log_dir", "", "folder of the process_<i>.log files (default: a "
                    "temporary folder)", flag_values=FLAGS)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(index: int, num_processes: int, devices_per_process: int, port: int,
                base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of process ``index``: the pod contract plus D simulated devices (the
    base's other XLA flags kept, e.g. ``--xla_cpu_max_isa=AVX2``)."""
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
               JAX_PROCESS_ID=str(index), JAX_PLATFORMS="cpu",
               XLA_FLAGS=" ".join(
                   [*flags, f"--xla_force_host_platform_device_count={devices_per_process}"]))
    return env


@dataclasses.dataclass
class ProcessResult:
    """Attributes: index, returncode (None if it had to be killed), log (its output)."""

    index: int
    returncode: int | None
    log: str


class PodFailed(RuntimeError):
    """A process of the local pod failed or the pod ran out of time (message: every log)."""


class LocalPod:
    """N processes of one command, started together; ``wait`` collects them.

    Args:
      argv: the command each process runs.
      num_processes: N; devices_per_process: D.
      env: the base environment (default: this process's).
      cwd: working folder of the processes.
      log_dir: where ``process_<i>.log`` go (default: a temporary folder).
    """

    def __init__(self, argv: Sequence[str], *, num_processes: int, devices_per_process: int,
                 env: Mapping[str, str] | None = None, cwd: str | None = None,
                 log_dir: str | None = None):
        self.argv, self.n, self.d = list(argv), num_processes, devices_per_process
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="mio_jax_pod_")
        os.makedirs(self.log_dir, exist_ok=True)
        port = free_port()
        self._files = [open(os.path.join(self.log_dir, f"process_{i}.log"), "wb")
                       for i in range(self.n)]
        self.procs = [subprocess.Popen(self.argv, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                       env=process_env(i, self.n, self.d, port, env))
                      for i, f in enumerate(self._files)]

    def log(self, index: int) -> str:
        with open(os.path.join(self.log_dir, f"process_{index}.log"), "rb") as f:
            return f.read().decode(errors="replace")

    def signal(self, index: int, sig: int = signal.SIGTERM) -> None:
        """Sends ``sig`` to process ``index`` (e.g. a preemption notice to one host)."""
        self.procs[index].send_signal(sig)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Waits for ``predicate`` while every process runs; a process that ends early or
        the timeout kills the pod and raises ``PodFailed``."""
        deadline = time.time() + timeout
        while not predicate():
            ended = [i for i, p in enumerate(self.procs) if p.poll() is not None]
            if ended or time.time() > deadline:
                self.kill()
                why = (f"process(es) {ended} ended early" if ended
                       else f"condition not met within {timeout:.0f} s")
                raise PodFailed(self._report(why))
            time.sleep(0.05)

    def wait(self, timeout: float, *, check: bool = True,
             grace: float = 30.0) -> list[ProcessResult]:
        """Waits for every process. Once one fails, the others get ``grace`` seconds, then are
        killed; so are all at ``timeout``. Raises ``PodFailed`` (every log) with ``check``
        when any exit status is not 0."""
        deadline = time.time() + timeout
        failed_at = None
        while any(p.poll() is None for p in self.procs):
            now = time.time()
            if failed_at is None and any(p.poll() not in (None, 0) for p in self.procs):
                failed_at = now
            if now > deadline or (failed_at is not None and now > failed_at + grace):
                break
            time.sleep(0.05)
        timed_out = [i for i, p in enumerate(self.procs) if p.poll() is None]
        self.kill()
        for f in self._files:
            f.close()
        results = [ProcessResult(i, None if i in timed_out else p.returncode, self.log(i))
                   for i, p in enumerate(self.procs)]
        if check and any(r.returncode != 0 for r in results):
            codes = {r.index: r.returncode for r in results}
            raise PodFailed(self._report(f"exit statuses {codes} (None: killed, still "
                                         f"running after the others or at {timeout:.0f} s)"))
        return results

    def _report(self, why: str, tail: int = 6000) -> str:
        parts = [f"local pod of {self.n} x {self.d} devices: {why}; command: {self.argv}"]
        for i in range(self.n):
            parts.append(f"----- process {i} ({self.log_dir}/process_{i}.log), last "
                         f"{tail} characters -----\n{self.log(i)[-tail:]}")
        return "\n".join(parts)


def run(argv: Sequence[str], *, num_processes: int, devices_per_process: int,
        timeout: float = 600.0, **kwargs) -> list[ProcessResult]:
    """Runs ``argv`` as a local pod to the end (``LocalPod`` + ``wait``)."""
    pod = LocalPod(argv, num_processes=num_processes, devices_per_process=devices_per_process,
                   **kwargs)
    return pod.wait(timeout)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mio_jax.local_pod --num_processes=N [flags] -- COMMAND ...``; ``argv``: the
    arguments after the program name (default: the command line's). Returns the exit
    status: 1 when the pod failed."""
    return cli.run(_local_pod, FLAGS, __doc__, argv)


def _local_pod(command: list[str]) -> int:
    """Runs ``command`` as a pod of the parsed flags' shape; returns the exit status."""
    if not command:
        errors.fail("expected the command to run after the flags, e.g. -- python -m mio_jax.main")
    pod = LocalPod(command, num_processes=FLAGS.num_processes,
                   devices_per_process=FLAGS.devices_per_process, log_dir=FLAGS.log_dir or None)
    print(f"local pod: {FLAGS.num_processes} processes x {FLAGS.devices_per_process} devices; "
          f"logs in {pod.log_dir}", flush=True)
    try:
        pod.wait(FLAGS.timeout)
    except PodFailed as e:
        print(e, file=sys.stderr)
        return 1
    print(pod.log(0)[-4000:])
    return 0


if __name__ == "__main__":
    main()
