"""The processes of a run: the Accelerator, thread counts, all-rank sums and a clean exit."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from model.precision import precision
from train import fp8, trackers
from train.config import TrainConfig

PARENT_PID = os.getppid()  # the process that started this one: a launcher, a shell, ...
CPU_LAUNCH = ("ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {n} -m train "
              "CONFIG, or NPROC={n} launch/cpu.sh CONFIG")


class LaunchError(Exception):
    """The launch started another number of processes than was asked for (a user error)."""


class PeerLost(RuntimeError):
    """A rank stopped answering for collective_timeout_s: this rank cannot go on (one line)."""


EXIT_PEER_LOST = 1


def launcher_command(pid: int = PARENT_PID) -> tuple[str, list[str]] | None:
    """("accelerate", its launch arguments) or ("torchrun", its arguments) when the process
    `pid` (by default this one's parent) is such a launcher, else None."""
    try:
        cmdline = psutil.Process(pid).cmdline()
    except (psutil.Error, OSError):
        return None
    for i, arg in enumerate(cmdline):
        name = os.path.basename(arg)
        if name == "accelerate" and cmdline[i + 1 : i + 2] == ["launch"]:
            return "accelerate", cmdline[i + 2 :]
        if arg == "accelerate.commands.launch":
            return "accelerate", cmdline[i + 1 :]
        if name == "torchrun" or arg == "torch.distributed.run":
            return "torchrun", cmdline[i + 1 :]
    return None


def requested_processes(launch_args: list[str]) -> int | None:
    """The process count an `accelerate launch` command line asks for: its --num_processes, else
    its config file's num_processes; None when neither says."""
    from accelerate.commands.config.config_args import default_config_file, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    try:
        args, _ = launch_command_parser().parse_known_args(launch_args)
    except SystemExit:  # not a command line accelerate itself would have accepted
        return None
    if args.num_processes is not None:
        return int(args.num_processes)
    config_file = args.config_file or default_config_file
    if not os.path.isfile(config_file):
        return None
    try:
        return load_config_from_file(config_file).num_processes
    except Exception:  # an unreadable config file: accelerate would have refused it
        return None


def check_launch() -> None:
    """Refuse a launch that started fewer processes than its launcher was asked for.

    `accelerate launch --num_processes 2` without --multi_gpu (and without a multi-device
    config) starts ONE process and sets no WORLD_SIZE, so the run would silently train alone.
    Launchers that start the ranks themselves (torchrun, --multi_gpu) set WORLD_SIZE; the
    Accelerator's process count is checked against it in build_accelerator."""
    if "WORLD_SIZE" in os.environ:
        return
    launcher = launcher_command()
    if launcher is None or launcher[0] != "accelerate":
        return
    asked = requested_processes(launcher[1])
    if asked is not None and asked > 1:
        raise LaunchError(
            f"accelerate launch was asked for --num_processes {asked} but started 1 process "
            f"(without --multi_gpu it starts only one). For {asked} CPU processes run "
            + CPU_LAUNCH.format(n=asked)
        )


EXIT_DIR = "TOKENCLOCK_EXIT_DIR"  # set by launch/*.sh: each rank leaves its exit code there


@contextlib.contextmanager
def exit_status() -> Iterator[None]:
    """Around a rank's whole life: a LaunchError becomes one `error:` line and exit code 2, and
    the exit code is written to $TOKENCLOCK_EXIT_DIR/rank_<RANK> when the launch scripts set it.
    `accelerate launch` reports any rank's non-zero exit as its own exit 1; the scripts read
    these files to exit 75 (checkpointed and stopped) when every rank did."""
    code: int = 1
    try:
        yield
        code = 0
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
        raise SystemExit(2) from None
    except PeerLost as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = EXIT_PEER_LOST
        _record_exit(code)
        # Not a normal exit: the process group's threads and destructors would wait for the
        # silent rank, forever. The last good checkpoint is already on disk.
        os._exit(code)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        raise
    finally:
        _record_exit(code)


def _record_exit(code: int) -> None:
    if os.environ.get(EXIT_DIR):
        with contextlib.suppress(OSError):
            path = Path(os.environ[EXIT_DIR]) / f"rank_{os.environ.get('RANK', '0')}"
            path.write_text(f"{code}\n")


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    """An Accelerator for this config, refusing set-ups that would silently do something else."""
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError(
            "mixed_precision=fp16 needs a GPU: on CPU accelerate silently trains in fp32 instead. "
            "Use mixed_precision=bf16 or mixed_precision=no."
        )
    if cfg.mixed_precision == "fp8":
        fp8.check_available()  # one line where there is no CUDA, no sm_89+ or no torchao
    accelerator = Accelerator(
        mixed_precision=precision(cfg.mixed_precision).accelerate,  # fp8: bf16 autocast around it
        log_with=trackers.log_with(cfg.tracker),  # wandb: online with credentials, else offline
        project_dir=cfg.out_dir,
        # every collective (gloo and NCCL alike) gives up after this long without its peers
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout_s))],
    )
    expected = cfg.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise LaunchError(
            f"asked for world_size={expected} but got {accelerator.num_processes} process(es) "
            f"(distributed type {accelerator.distributed_type}). On a CPU-only host launch with "
            + CPU_LAUNCH.format(n=expected)
        )
    dp = accelerator.num_processes // (cfg.parallel.tp * cfg.parallel.cp)  # tp, cp share batches
    if cfg.batch_size % (cfg.micro_batch_size * dp):
        raise ValueError(
            f"batch_size={cfg.batch_size} must be a multiple of micro_batch_size x data-parallel "
            f"ranks = {cfg.micro_batch_size} x {dp} (world_size {accelerator.num_processes} / "
            f"tp {cfg.parallel.tp} / cp {cfg.parallel.cp})"
        )
    return accelerator


def set_threads(cfg: TrainConfig, accelerator: Accelerator) -> None:
    """Share the cores between the processes of this machine instead of oversubscribing them."""
    if accelerator.device.type != "cpu":
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    torch.set_num_threads(cfg.threads_per_process or max(1, (os.cpu_count() or 1) // local))
    torch.set_flush_denormal(True)  # denormals make fp32 CPU matmuls several times slower


def global_sum(value: float | torch.Tensor, accelerator: Accelerator) -> float:
    """Sum of a scalar over all ranks."""
    t = torch.as_tensor(value, dtype=torch.float64, device=accelerator.device).clone()
    if accelerator.num_processes > 1:
        dist.all_reduce(t)
    return float(t)


def weight_checksums(model: torch.nn.Module, accelerator: Accelerator) -> list[str]:
    """SHA-256 of every rank's parameters, gathered on all ranks; raises if they differ (DDP
    keeps them identical, and under FSDP each rank checks its own unsharded copy)."""
    digest = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().numpy().tobytes())
    mine = digest.hexdigest()
    if accelerator.num_processes == 1:
        return [mine]
    gathered: list[str] = [""] * accelerator.num_processes
    dist.all_gather_object(gathered, mine)
    if len(set(gathered)) != 1:
        raise RuntimeError(f"ranks ended with different weights: {gathered}")
    return gathered


def finish(accelerator: Accelerator) -> None:
    """End the run on every rank: wait for the others, close the trackers and destroy the
    process group (accelerate's end_training), then sleep briefly with the GIL released.

    Why the sleep: after the last barrier a gloo worker thread still has to free that
    collective's work, which drops Python-owned tensors and so needs the GIL. If the main
    thread meanwhile frees the DDP/FSDP model, the model's reducer frees the process group,
    whose destructor joins the worker threads while holding the GIL: both wait forever (a
    known PyTorch hazard, pytorch/pytorch#56297). It hung a 2-process run here at exit, after
    all its files were written. Sleeping lets the worker finish first."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.num_processes > 1:
        time.sleep(0.2)


# What a collective's error says when a peer went silent or away (gloo, NCCL, the TCP store)
PEER_SIGNS = ("timed out", "timeout", "connection closed by peer", "connection reset by peer",
              "broken pipe")


class PeerWatch:
    """Names the rank that stopped answering when a collective times out.

    Every rank's thread adds one to its counter in the launch's key-value store (the TCPStore
    at MASTER_ADDR:MASTER_PORT that torchrun's agent serves) every BEAT_S seconds; a frozen rank
    (SIGSTOP, a hung device, a dead host) stops counting. When a collective fails with a
    timeout, the survivors note that they are alive and watch the counters for a few beats: the
    ranks whose counters stand still are the ones that stopped answering. A store that does not
    answer either (it lives in rank 0 when the launcher is not torchrun) is said so.
    """

    BEAT_S = 1.0

    def __init__(self, rank: int, world: int, timeout_s: float):
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.where: Callable[[], str] = str  # the loop's "at step N; last good checkpoint ..."
        self.beating = False
        self._stop = threading.Event()
        if world > 1 and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
            with contextlib.suppress(Exception):  # no store, no names: the timeout still holds
                self._thread = threading.Thread(target=self._beat, args=(self._client(),),
                                                daemon=True, name="heartbeat")
                self._thread.start()
                self.beating = True
                # A daemon thread still inside the store's C++ code when the interpreter
                # finalises aborts the process ("terminate called without an active
                # exception", exit 1 after a finished run): stop and join it first.
                atexit.register(self.close)

    def close(self) -> None:
        """Stop the heartbeat thread and wait for it (a few seconds at most)."""
        self._stop.set()
        if self.beating:
            self._thread.join(timeout=5)

    def _client(self):
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                             is_master=False, timeout=timedelta(seconds=10))

    def _beat(self, store) -> None:
        with contextlib.suppress(Exception):  # the store went away: the run is ending
            while not self._stop.is_set():
                store.add(f"tokenclock/beat/{self.rank}", 1)
                self._stop.wait(self.BEAT_S)
        del store  # closed here, in this thread, not at interpreter exit

    def silent_ranks(self) -> list[int] | None:
        """The ranks whose heartbeat stands still (this rank excluded, and the ranks that saw
        the timeout too), or None when the store does not answer."""
        if not self.beating:
            return None
        try:
            store = self._client()
            store.add(f"tokenclock/timed_out/{self.rank}", 1)

            def beats() -> list[int]:
                return [store.add(f"tokenclock/beat/{r}", 0) for r in range(self.world)]

            first = beats()
            time.sleep(3 * self.BEAT_S)
            last = beats()
            return [r for r in range(self.world) if r != self.rank and first[r] == last[r]
                    and not store.add(f"tokenclock/timed_out/{r}", 0)]
        except Exception:
            return None

    def explain(self, timed_out: bool) -> str:
        """The one line: who stopped answering (a timeout) or ended (a closed connection:
        that rank's own message, if it could write one, says why)."""
        silent = self.silent_ranks()
        limit = f"collective_timeout_s={self.timeout_s:g} s"
        verb = f"stopped answering: no reply within {limit}" if timed_out else \
            "ended or lost its connection"
        if silent:
            who = f"rank {silent[0]}" if len(silent) == 1 else f"ranks {', '.join(map(str, silent))}"
            what = f"{who} {verb}"
        elif silent is None:
            what = (f"a rank {verb} (the launch's store did not say which: rank 0 hosts it "
                    "outside torchrun, or the network is down)")
        elif timed_out:
            what = (f"a collective took longer than {limit} while every rank was alive: raise "
                    "collective_timeout_s if steps or saves are that slow")
        else:
            what = "a rank closed its connection"
        return f"{what}, {self.where()}; stopping (resume with resume=auto)"

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Around the run: a collective that failed for want of a peer becomes PeerLost."""
        try:
            yield
        except RuntimeError as e:
            text = str(e).lower()
            if self.world == 1 or isinstance(e, PeerLost) or not any(s in text for s in PEER_SIGNS):
                raise
            raise PeerLost(self.explain("timed out" in text or "timeout" in text)) from e
