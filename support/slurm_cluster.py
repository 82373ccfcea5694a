"""A throwaway SLURM cluster on this machine, for the tests that run the workflow through SLURM.

Debian's slurm-wlm 22.05 (installed by `make slurm`, as root): munged, MariaDB with slurmdbd (so
`sacct` answers from the accounting database, as on a real cluster, and the executor plugin's
default status queries and account check work), slurmctld and two slurmd "nodes", n1 and n2.
Debian builds slurmd without --enable-multiple-slurmd, so each slurmd runs in its own UTS
namespace (`unshare --uts`) with its node's hostname; both listen on 127.0.0.1, each on its own
port. Its own mount namespace shows the cluster's etc/ as /etc/slurm to the jobs (the executor's
jobstep plugin 0.6.1 drops SLURM_CONF before its inner `srun`, which then finds the
configuration only at the default path, where a real cluster has it) and an /etc/hosts where the
node names resolve, as a cluster's DNS would.
The nodes declare the shape of a paper-run GPU node (64 CPUs, 500 GB, 8 GPUs; the machine is
smaller, hence SlurmdParameters=config_overrides), so profiles/slurm's requests fit unchanged.
Their GPUs are character devices like /dev/null, listed in gres.conf with AutoDetect=off: SLURM
allocates and accounts `gres/gpu` and sets CUDA_VISIBLE_DEVICES, torch finds no CUDA, and
training runs on CPU. Process tracking is proctrack/linuxproc with task/none (no cgroups
needed). Everything (configs, state, logs, sockets) lives under one folder.

    python -m support.slurm_cluster start DIR   # prints: export SLURM_CONF=DIR/etc/slurm.conf
    python -m support.slurm_cluster stop DIR
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

CLUSTER = "asclepius"
PARTITION = "demo"
ACCOUNT = "asclepius"
NODES = ("n1", "n2")
GPUS_PER_NODE = 8
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")
# Readiness waits of the daemons (not of any test): generous for a loaded 2-core CI machine.
READY_S = 120


def unavailable_reason() -> str | None:
    """Why this machine cannot run the cluster, or None when it can."""
    missing = [
        name for name in (*DAEMONS, "mariadb-install-db", "mariadb", "unshare", "sacctmgr") if not shutil.which(name)
    ]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} not found; `make slurm` installs it, as root)"
    if os.geteuid() != 0:
        return "the local SLURM cluster runs its daemons as root (munged key, device nodes, unshare)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def running(pid: int) -> bool:
    """Whether `pid` is alive (a zombie, left where nothing reaps orphans, counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(check, what: str, logfile: Path) -> None:
    deadline = time.monotonic() + READY_S
    while not check():
        if time.monotonic() > deadline:
            tail = logfile.read_text(errors="replace")[-3000:] if logfile.exists() else "(no log)"
            raise RuntimeError(f"{what} not ready after {READY_S} s; {logfile}:\n{tail}")
        time.sleep(0.5)


class SlurmCluster:
    """The cluster's folder, configuration and daemons; `start()` and `stop()` it."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        # munged refuses a socket in a folder that not everybody may enter.
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self.run_dir, self.log_dir = self.root / "run", self.root / "log"
        self.etc = self.root / "etc"
        self.conf = self.etc / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def command(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """A command against this cluster; a failure raises with the command and its own message."""
        result = subprocess.run(args, env=self.env, capture_output=True, text=True)
        if check and result.returncode != 0:
            message = (result.stderr or result.stdout).strip()
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {message}")
        return result

    def _ok(self, *args: str) -> bool:
        return self.command(*args, check=False).returncode == 0

    def write_config(self) -> None:
        for folder in (
            self.etc,
            self.run_dir,
            self.log_dir,
            self.root / "state",
            self.root / "spool",
            self.root / "gpus",
        ):
            folder.mkdir(parents=True, exist_ok=True)
        for index in range(GPUS_PER_NODE):
            device = self.root / "gpus" / f"gpu{index}"
            if not device.exists():
                os.mknod(device, 0o666 | 0o020000, os.makedev(1, 3))  # a character device like /dev/null
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        ports = {name: free_port() for name in ("ctld", "dbd", "db", *NODES)}
        self.db_port = ports["db"]
        run, logs = self.run_dir, self.log_dir
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={n} NodeAddr=127.0.0.1 Port={ports[n]} CPUs=64 RealMemory=500000 "
            f"Gres=gpu:{GPUS_PER_NODE} State=UNKNOWN"
            for n in NODES
        )
        self.conf.write_text(
            f"""ClusterName={CLUSTER}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ports["ctld"]}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={run}/munge.socket
CredType=cred/munge
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={run}/slurmctld.pid
SlurmdPidFile={run}/slurmd-%n.pid
SlurmctldLogFile={logs}/slurmctld.log
SlurmdLogFile={logs}/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={ports["dbd"]}
AccountingStoragePass={run}/munge.socket
AccountingStorageTRES=gres/gpu
GresTypes=gpu
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
MinJobAge=600
ReturnToService=2
{nodes}
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        )
        (self.etc / "gres.conf").write_text(
            f"AutoDetect=off\nNodeName=n[1-{len(NODES)}] Name=gpu File={self.root}/gpus/gpu[0-{GPUS_PER_NODE - 1}]\n"
        )
        # slurmdbd reads slurmdbd.conf next to slurm.conf; it must be private to SlurmUser.
        dbd_conf = self.etc / "slurmdbd.conf"
        dbd_conf.write_text(
            f"""AuthType=auth/munge
AuthInfo=socket={run}/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={ports["dbd"]}
SlurmUser=root
LogFile={logs}/slurmdbd.log
PidFile={run}/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports["db"]}
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
"""
        )
        dbd_conf.chmod(0o600)
        # What a cluster's DNS does: node names resolve (torchrun's c10d rendezvous hands the
        # ranks the hosting node's hostname as the master address).
        hosts = Path("/etc/hosts").read_text() + f"127.0.0.1 {' '.join(NODES)}\n"
        (self.etc / "hosts").write_text(hosts)

    def _start_database(self) -> None:
        data = self.root / "db"
        self.command("mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root", "--skip-test-db")
        sock = self.run_dir / "mysql.sock"
        # setsid -f: mariadbd does not daemonize itself, and must outlive `start` (the CLI); its
        # messages go to --log-error, and its stdout must not hold a pipe of ours open.
        with open(self.log_dir / "mariadb.out", "w") as out:
            subprocess.run(
                [
                    "setsid",
                    "-f",
                    "mariadbd",
                    "--no-defaults",
                    f"--datadir={data}",
                    f"--socket={sock}",
                    f"--port={self.db_port}",
                    "--bind-address=127.0.0.1",
                    "--user=root",
                    f"--pid-file={self.run_dir}/mariadbd.pid",
                    f"--log-error={self.log_dir}/mariadb.log",
                    "--innodb-buffer-pool-size=64M",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                check=True,
            )
        wait_until(sock.exists, "MariaDB", self.log_dir / "mariadb.log")
        sql = (
            "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm'; "
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
        )
        self.command("mariadb", "--no-defaults", "-S", str(sock), "-u", "root", "-e", sql)

    def start(self) -> None:
        """Start every daemon and wait until both nodes are idle and accounting answers."""
        log.info("starting SLURM in %s", self.root)
        self.write_config()
        run = self.run_dir
        self.command(
            "munged",
            f"--key-file={self.root}/munge.key",
            f"--socket={run}/munge.socket",
            f"--pid-file={run}/munged.pid",
            f"--log-file={self.log_dir}/munged.log",
            f"--seed-file={run}/munge.seed",
        )
        self._start_database()
        self.command("slurmdbd")
        wait_until(lambda: self._ok("sacctmgr", "-n", "list", "cluster"), "slurmdbd", self.log_dir / "slurmdbd.log")
        self.command("sacctmgr", "-i", "add", "cluster", CLUSTER)
        self.command("sacctmgr", "-i", "add", "account", ACCOUNT)
        self.command("sacctmgr", "-i", "add", "user", "root", f"account={ACCOUNT}")
        self.command("slurmctld", "-f", str(self.conf))
        for node in NODES:
            self.command(
                "unshare",
                "--uts",
                "--mount",
                "sh",
                "-c",
                f"hostname {node} && mount --bind {self.etc} /etc/slurm && mount --bind {self.etc}/hosts /etc/hosts "
                f'&& exec slurmd -N {node} -f "$SLURM_CONF"',
            )
        wait_until(self.nodes_idle, "nodes " + ",".join(NODES), self.log_dir / "slurmctld.log")

    def nodes_idle(self) -> bool:
        states = self.command("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        return states[1::2] == ["idle"] * len(NODES)

    def stop(self) -> None:
        """Cancel what is left, then stop the daemons in reverse order and wait for them to exit."""
        if (self.run_dir / "slurmctld.pid").exists():
            self.command("scancel", "--user=root", check=False)
            wait_until(
                lambda: not self.command("squeue", "-h", check=False).stdout.strip(),
                "an empty queue",
                self.log_dir / "slurmctld.log",
            )
        pid_files = [f"slurmd-{n}.pid" for n in NODES] + ["slurmctld.pid", "slurmdbd.pid", "mariadbd.pid", "munged.pid"]
        for name in pid_files:
            pid_file = self.run_dir / name
            if not pid_file.exists():
                continue
            pid = int(pid_file.read_text().split()[0])
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            wait_until(lambda pid=pid: not running(pid), f"the end of {name[:-4]}", self.log_dir / f"{name[:-4]}.log")
        log.info("stopped SLURM in %s", self.root)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    cluster = SlurmCluster(args.folder)
    if args.action == "start":
        reason = unavailable_reason()
        if reason:
            raise SystemExit(reason)
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    main()
