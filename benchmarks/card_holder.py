"""Make a big GPU look like a consumer card to everything, and read the card as NVML sees it.

``torch.cuda.set_per_process_memory_fraction`` only limits torch's allocator in one process: NVML (and
so our auto-fit), the CUDA context and memory outside torch (Triton, compile, Unsloth's buffers) never
see it. Here a separate *holder* process takes VRAM until the driver reports the free memory of the
card being simulated; every other process then sees that card.

  python -m benchmarks.card_holder --free-bytes N [--nvml-index I]   # the holder: READY <nvml free>, sleeps

The parent side (:class:`HeldCard`, :class:`NvmlCard`) never imports torch, so the simulator itself
holds no CUDA context that would distort the free memory.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 1024**3
MIB = 1024**2
TOLERANCE_BYTES = 16 * MIB
"""How close to the target free memory the holder stops."""
CHUNK_BYTES = 1 * GIB
GRANULE_BYTES = 2 * MIB
"""cudaMalloc's and torch's rounding for large blocks: the holder asks in whole granules."""
READY_TIMEOUT_S = 180.0


# ---------------------------------------------------------------- the holder process

def hold_until_free(target_free: int) -> list[Any]:
    """Allocate uint8 blocks on the GPU until ``mem_get_info`` reports ``target_free`` (+- the tolerance).
    The CUDA context is created first, so it is counted. Overshoot (a block bigger than asked) gives the
    last block back and continues with smaller ones."""
    import torch

    torch.cuda.init()
    torch.empty(1, device="cuda")  # the context exists from here on: mem_get_info includes it
    blocks: list[Any] = []
    chunk = CHUNK_BYTES
    for _ in range(10_000):
        free = torch.cuda.mem_get_info()[0]
        gap = free - target_free
        if abs(gap) <= TOLERANCE_BYTES:
            return blocks
        if gap < 0:  # took too much: give the last block back, then go on in smaller steps
            if not blocks:
                raise SystemExit(f"only {free / GIB:.2f} GiB free after the holder's own CUDA context: "
                                 f"can't simulate {target_free / GIB:.2f} GiB free (is something else on the GPU?)")
            blocks.pop()
            torch.cuda.empty_cache()
            chunk = max(chunk // 2, GRANULE_BYTES)
            continue
        size = min(chunk, gap - gap % GRANULE_BYTES)
        if size < GRANULE_BYTES:
            return blocks  # within one granule of the target: as close as cudaMalloc gets
        blocks.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
    raise SystemExit("the holder did not converge on the target free memory")


def nvml_free_bytes(index: int) -> int:
    import pynvml

    pynvml.nvmlInit()
    return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).free)


def holder_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.card_holder")
    parser.add_argument("--free-bytes", type=int, required=True)
    parser.add_argument("--nvml-index", type=int, default=0)
    args = parser.parse_args(argv)
    blocks = hold_until_free(args.free_bytes)
    import torch

    held, cuda_free = sum(b.numel() for b in blocks), torch.cuda.mem_get_info()[0]
    print(f"READY {nvml_free_bytes(args.nvml_index)} {held} {cuda_free}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:  # hold until killed
        time.sleep(3600)


# ---------------------------------------------------------------- the parent's side

def nvml_index() -> int:
    """The NVML index of the GPU torch calls cuda:0 (CUDA_VISIBLE_DEVICES' first entry, when a number)."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


@dataclass
class NvmlCard:
    """One GPU as NVML sees it: its name, driver, free memory, and the peak use of a worker process."""

    index: int = field(default_factory=nvml_index)
    handle: Any = None

    def __post_init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)

    def describe(self) -> dict[str, Any]:
        import pynvml

        name = pynvml.nvmlDeviceGetName(self.handle)
        driver = pynvml.nvmlSystemGetDriverVersion()
        as_text = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731 - old pynvml: bytes
        return {"name": as_text(name), "driver": as_text(driver), "total_gib": self.memory().total / GIB,
                "compute_mode": int(pynvml.nvmlDeviceGetComputeMode(self.handle))}

    def check_shareable(self) -> None:
        """The holder and the worker each need a CUDA context on this GPU at the same time."""
        import pynvml

        if pynvml.nvmlDeviceGetComputeMode(self.handle) != pynvml.NVML_COMPUTEMODE_DEFAULT:
            raise SystemExit("this GPU is not in the default compute mode (exclusive or prohibited), so the VRAM "
                             "holder and the training worker can't share it: the simulator can't run here")

    def memory(self) -> Any:
        import pynvml

        return pynvml.nvmlDeviceGetMemoryInfo(self.handle)

    def free_bytes(self) -> int:
        return int(self.memory().free)

    def used_bytes(self) -> int:
        return int(self.memory().used)

    def process_bytes(self, pids: set[int]) -> int | None:
        """GPU memory used by these pids (CUDA context and non-torch memory included); None when NVML
        lists none of them (another pid namespace, as in containers) or can't say per process."""
        import pynvml

        try:
            listed = pynvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except pynvml.NVMLError:
            return None
        found = [used for p in listed if p.pid in pids and (used := getattr(p, "usedGpuMemory", None)) is not None]
        return sum(found) if found else None


@dataclass
class HeldCard:
    """A running holder: started with :meth:`start`, always ended with :meth:`release` (try/finally)."""

    proc: subprocess.Popen
    target_free: int
    nvml_free_at_ready: int
    held_bytes: int
    cuda_free_at_ready: int

    @classmethod
    def start(cls, target_free: int, env: dict[str, str], cwd: Path, command: list[str] | None = None) -> HeldCard:
        """Start the holder and wait for its READY line (``command`` replaces it in tests)."""
        cmd = command or [sys.executable, "-m", "benchmarks.card_holder", "--free-bytes", str(target_free),
                          "--nvml-index", str(nvml_index())]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
                                start_new_session=True)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line.rstrip()) for line in proc.stdout or ()], daemon=True).start()
        seen: list[str] = []
        deadline = time.monotonic() + READY_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                try:
                    line = lines.get(timeout=0.5)
                except queue.Empty:
                    if proc.poll() is not None and lines.empty():
                        break
                    continue
                seen.append(line)
                if line.startswith("READY "):
                    free, held, cuda_free = (int(x) for x in line.split()[1:4])
                    return cls(proc, target_free, free, held, cuda_free)
        except BaseException:
            end_process(proc)
            raise
        end_process(proc)
        raise HolderFailed("the VRAM holder did not get ready: " + " | ".join(seen[-6:] or ["no output"]))

    def release(self) -> None:
        end_process(self.proc)


class HolderFailed(RuntimeError):
    """The holder could not take the card down to the target (the message has its last output lines)."""


def end_process(proc: subprocess.Popen) -> None:
    """Kill a child and everything it started, and reap it, so none keeps GPU memory."""
    from benchmarks.memory_speed import kill_tree

    if proc.poll() is None:
        try:
            kill_tree(proc.pid)
        except ProcessLookupError:
            pass
    proc.wait()


if __name__ == "__main__":
    sys.exit(holder_main())
