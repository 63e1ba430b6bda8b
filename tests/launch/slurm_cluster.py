"""A real one-node SLURM cluster on localhost, all state under one folder (the recipe
measured in /work/shared/ENVIRONMENT.md): munged, slurmctld and slurmd as root, node name =
`hostname -s`, 2 CPUs. Daemons run in a ProcessScope, so closing it stops them and every job
process they started."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from stem_megatron.parallel.local_workers import free_port
from tests.launch.processes import ProcessScope

PACKAGES = ["slurm-wlm", "munge"]
DAEMONS = ["munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol"]


def install() -> str | None:
    """Install SLURM and munge from Debian if missing; the reason if that is impossible."""
    if all(shutil.which(d) for d in DAEMONS):
        return None
    if not shutil.which("apt-get"):
        return "slurm-wlm/munge are not installed and there is no apt-get"
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        try:
            result = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=600,
                env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"`{' '.join(cmd)}` failed: {exc}"
        if result.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {result.stderr.strip()[-500:]}"
    missing = [d for d in DAEMONS if not shutil.which(d)]
    return f"installed {PACKAGES} but {missing} are still missing" if missing else None


def _slurm_conf(state: Path, node: str, socket_path: Path) -> str:
    return (
        "\n".join(
            [
                "ClusterName=stemtest",
                f"SlurmctldHost={node}(127.0.0.1)",
                f"SlurmctldPort={free_port()}",
                f"SlurmdPort={free_port()}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                # cred_expire=10: a requeued job may start again after 11 s instead of 121 s
                f"AuthInfo=socket={socket_path},cred_expire=10",
                f"StateSaveLocation={state}/state",
                f"SlurmdSpoolDir={state}/spool",
                f"SlurmctldPidFile={state}/slurmctld.pid",
                f"SlurmdPidFile={state}/slurmd.pid",
                f"SlurmctldLogFile={state}/slurmctld.log",
                f"SlurmdLogFile={state}/slurmd.log",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "MpiDefault=none",
                "ReturnToService=2",
                "KillWait=5",
                "MailProg=/bin/true",
                "SchedulerParameters=sched_interval=2",
                f"NodeName={node} NodeAddr=127.0.0.1 CPUs=2 RealMemory=2000",
                f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP",
            ]
        )
        + "\n"
    )


class SlurmCluster:
    def __init__(self):
        # Not under pytest's tmp (mode 700): munged needs every parent of its socket
        # searchable by all.
        self.state = state = Path(tempfile.mkdtemp(prefix="stem_slurm_"))
        state.chmod(0o711)
        self.scope = ProcessScope(state)
        self.node = socket.gethostname().split(".")[0]
        munge = state / "munge"
        for d in (munge, state / "state", state / "spool"):
            d.mkdir(parents=True)
        munge.chmod(0o711)
        self.conf = state / "slurm.conf"
        self.conf.write_text(_slurm_conf(state, self.node, munge / "munge.socket.2"))
        self.env = self.scope.env(SLURM_CONF=str(self.conf))

    def start(self) -> None:
        munge = self.state / "munge"
        subprocess.run(
            ["mungekey", "-c", "-k", str(munge / "munge.key")],
            check=True,
            capture_output=True,
            timeout=30,
        )
        self.scope.start(
            [
                "munged",
                "-F",
                f"--key-file={munge / 'munge.key'}",
                f"--socket={munge / 'munge.socket.2'}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--seed-file={munge / 'munge.seed'}",
                f"--log-file={munge / 'munged.log'}",
            ],
            "munged",
            env=self.env,
        )
        self.until(lambda: (munge / "munge.socket.2").exists(), 20, "munged's socket")
        self.scope.start(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld", env=self.env)
        self.scope.start(["slurmd", "-D", "-f", str(self.conf)], "slurmd", env=self.env)
        self.until(
            lambda: "idle" in self.run(["sinfo", "-h", "-o", "%T"], check=False),
            60,
            "the node to be idle",
        )

    def run(self, cmd: list[str], check: bool = True, **kwargs) -> str:
        result = subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, timeout=60, **kwargs
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{cmd} failed: {result.stdout}{result.stderr}")
        return result.stdout

    def sbatch(self, args: list[str], env: dict[str, str] | None = None, **kwargs) -> str:
        """Submit; the job id."""
        result = subprocess.run(
            ["sbatch", "--parsable", *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
            **kwargs,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        text = self.run(["scontrol", "show", "job", "-o", job_id])
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] in states:
                return info
            time.sleep(0.5)
        raise AssertionError(
            f"job {job_id} not in {states} after {timeout} s: {info}\n{self.logs()}"
        )

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
            for p in sorted(self.state.glob("*.log"))
        )

    def close(self) -> None:
        try:
            self.scope.close()  # daemons, step daemons and job processes alike
        finally:
            shutil.rmtree(self.state, ignore_errors=True)

    @staticmethod
    def until(condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.3)
