"""The launchers' dry-run commands, and what accelerate resolves from them.

Multi-GPU and multi-node launches cannot run here; these tests run each launcher with
DRY_RUN=1, then feed the printed `accelerate launch` arguments to accelerate's own parser and
launcher set-up, which resolve the config file into the process counts, ranks and FSDP
settings the real launch would use.
"""

import os
import shlex
import stat
import sys
from pathlib import Path

import pytest
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_multi_gpu_env

from tests.utils import ROOT, run_cmd

CONFIGS = ROOT / "launch" / "accelerate"


def dry_run(script: str, *args: str, env: dict | None = None) -> list[list[str]]:
    """The commands a launcher prints under DRY_RUN=1, one token list per line."""
    result = run_cmd([f"launch/{script}", *args], env={"DRY_RUN": "1", **(env or {})})
    return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def resolve(command: list[str]):
    """accelerate's view of an `accelerate launch ...` command: (args, launcher environment)."""
    launch_args = command[command.index("launch") + 1 :]
    args = launch_command_parser().parse_args(launch_args)
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args) if args.multi_gpu or args.use_fsdp else {}
    return args, env


def train_args(command: list[str]) -> list[str]:
    return command[command.index("-m") + 2 :]


def test_cpu_launcher_two_processes():
    (cmd,) = dry_run("cpu.sh", "configs/train/tiny.yaml", "steps=3",
                     env={"NPROC": "2", "PY": sys.executable, "MASTER_PORT": "29123"})
    # printed ready to paste: without ACCELERATE_USE_CPU=1 the ranks would look for GPUs
    assert cmd[0] == "ACCELERATE_USE_CPU=1"
    assert cmd[1].endswith("accelerate") and cmd[2] == "launch"
    assert train_args(cmd) == ["configs/train/tiny.yaml", "steps=3", "world_size=2"]
    args, _ = resolve(cmd)
    assert args.multi_gpu and args.num_processes == 2 and args.main_process_port == 29123


def test_cpu_launcher_one_process():
    (cmd,) = dry_run("cpu.sh", "configs/train/tiny.yaml", env={"NPROC": "1", "PY": sys.executable})
    assert cmd[0] == "ACCELERATE_USE_CPU=1"
    args, _ = resolve(cmd)
    assert not args.multi_gpu and args.num_processes == 1
    assert train_args(cmd)[-1] == "world_size=1"


@pytest.mark.parametrize("mode, multi, fsdp", [("ddp", True, False), ("fsdp2", False, True)])
def test_gpu_launcher(mode, multi, fsdp):
    (cmd,) = dry_run("gpu.sh", "configs/train/demo.yaml", "steps=5",
                     env={"MODE": mode, "NPROC": "8"})
    args, env = resolve(cmd)
    assert args.num_processes == 8 and args.multi_gpu == multi and args.use_fsdp == fsdp
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    overrides = train_args(cmd)
    assert overrides[0] == "configs/train/demo.yaml" and overrides[-1] == "world_size=8"
    assert "mixed_precision=bf16" in overrides
    # the user's key=value come after the mode's settings, so they win
    assert overrides.index("steps=5") > overrides.index("mixed_precision=bf16")
    if fsdp:
        assert "fsdp=true" in overrides
        assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
        assert env["FSDP_RESHARD_AFTER_FORWARD"] == "true"  # full shard
        assert env["FSDP_ACTIVATION_CHECKPOINTING"] == "true"
        assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "Block"


def test_gpu_launcher_single_gpu_and_bad_mode():
    (cmd,) = dry_run("gpu.sh", "configs/train/demo.yaml", env={"MODE": "single"})
    args, _ = resolve(cmd)
    assert args.num_processes == 1 and not args.multi_gpu
    bad = run_cmd(["launch/gpu.sh", "x.yaml"], env={"DRY_RUN": "1", "MODE": "tp", "NPROC": "2"},
                  check=False)
    assert bad.returncode == 2 and "MODE=tp" in bad.stderr


def test_multinode_launcher_resolves_rank_address_and_port():
    env = {"MASTER_ADDR": "node0", "MASTER_PORT": "29999", "NNODES": "4", "NODE_RANK": "3",
           "PROCS_PER_NODE": "8"}
    (cmd,) = dry_run("multinode.sh", "configs/train/demo.yaml", env=env)
    args, _ = resolve(cmd)
    assert args.multi_gpu and args.num_machines == 4 and args.num_processes == 32
    assert args.machine_rank == 3 and args.nproc_per_node == "8"
    assert args.main_process_ip == "node0" and args.main_process_port == 29999
    assert train_args(cmd)[-1] == "world_size=32"
    bad = run_cmd(["launch/multinode.sh", "x.yaml"], env={**env, "DRY_RUN": "1", "NODE_RANK": "4"},
                  check=False)
    assert bad.returncode == 2 and "NODE_RANK=4" in bad.stderr
    result = run_cmd(["launch/multinode.sh", "x.yaml"], env={**env, "DRY_RUN": "1", "MASTER_ADDR": ""},
                     check=False)
    assert result.returncode != 0 and "MASTER_ADDR" in result.stderr


def fake_scontrol(tmp_path: Path, *hosts: str) -> str:
    """A PATH whose `scontrol show hostnames` expands the job's node list to `hosts`."""
    fake = tmp_path / "bin"
    fake.mkdir()
    scontrol = fake / "scontrol"
    scontrol.write_text("#!/bin/sh\n" + "".join(f"echo {h}\n" for h in hosts))
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    return f"{fake}:{os.environ['PATH']}"


def test_slurm_script_takes_address_port_and_rank_from_slurm(tmp_path):
    env = {"PATH": fake_scontrol(tmp_path, "gpu-a17", "gpu-a18", "gpu-a19"),
           "SLURM_JOB_NODELIST": "gpu-a[17-19]", "SLURM_NNODES": "3", "SLURM_JOB_ID": "123456", "SLURM_GPUS_ON_NODE": "4",
           "SLURM_SUBMIT_DIR": str(ROOT)}
    lines = dry_run("slurm.sbatch", "configs/train/demo.yaml", "sample_prompt=a b", env=env)
    srun, *nodes = lines
    assert srun[0] == "srun" and srun[-2:] == ["configs/train/demo.yaml", "sample_prompt=a b"]
    assert "$SLURM_NODEID" in " ".join(srun)  # expanded by each task on its own node
    assert len(nodes) == 3
    for rank, cmd in enumerate(nodes):
        args, _ = resolve(cmd)
        assert args.machine_rank == rank and args.num_machines == 3 and args.num_processes == 12
        assert args.main_process_ip == "gpu-a17"
        assert args.main_process_port == 20000 + 123456 % 20000
        assert train_args(cmd) == ["configs/train/demo.yaml", "sample_prompt=a b", "world_size=12"]


def test_requeued_slurm_job_resumes(tmp_path):
    """A requeued job (SLURM_RESTART_COUNT >= 1) runs the same command with resume=auto added;
    tests/launch/test_slurm.py requeues real jobs."""
    env = {"PATH": fake_scontrol(tmp_path, "node1"), "SLURM_JOB_NODELIST": "node1",
           "SLURM_NNODES": "1", "SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(ROOT)}
    for restarts, added in (("0", []), ("2", ["resume=auto"])):
        srun, node = dry_run("slurm.sbatch", "configs/train/demo.yaml", "out_dir=runs/x",
                             env={**env, "SLURM_RESTART_COUNT": restarts})
        assert srun[-2 - len(added):] == ["configs/train/demo.yaml", "out_dir=runs/x", *added]
        assert train_args(node) == ["configs/train/demo.yaml", "out_dir=runs/x", *added,
                                    "world_size=8"]


def test_ray_slurm_script_starts_a_head_and_a_worker_per_other_node(tmp_path):
    env = {"PATH": fake_scontrol(tmp_path, "cpu-a1", "cpu-a2", "cpu-a3"),
           "SLURM_JOB_NODELIST": "cpu-a[1-3]", "SLURM_JOB_ID": "4242", "SLURM_CPUS_PER_TASK": "16", "SLURM_SUBMIT_DIR": str(ROOT)}
    head, *workers, prep = dry_run("ray_slurm.sbatch", "configs/prep/demo.yaml", "workers=8",
                                   env=env)
    port = 30000 + 4242 % 20000
    assert head[:6] == ["srun", "--nodes=1", "--ntasks=1", "-w", "cpu-a1", "python"]
    assert "--head" in head and f"--port={port}" in head and "--num-cpus=16" in head
    assert [w[4] for w in workers] == ["cpu-a2", "cpu-a3"]
    assert all(f"--address=cpu-a1:{port}" in w for w in workers)
    assert prep == [f"RAY_ADDRESS=cpu-a1:{port}", "python", "-m", "data_prep",
                    "configs/prep/demo.yaml", "workers=8", "executor=ray", "ray.address=auto"]


def test_slurm_script_outside_a_job_says_so():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = run_cmd(["launch/slurm.sbatch", "x.yaml"], env={**env, "DRY_RUN": "1"}, check=False)
    assert result.returncode != 0 and "not inside a SLURM job" in result.stderr


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_config_file_is_documented_in_the_readme(name):
    assert f"launch/accelerate/{name}" in (ROOT / "README.md").read_text()
    assert Path(CONFIGS / name).read_text().startswith("#")  # says what it is for
