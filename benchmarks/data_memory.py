"""Anonymous memory of a run on data larger than memory (docs/data.md).

Writes a random uint8 array of N x 32 x 32 x 3 (200,000 images: 614 MB on
disk, 2.4 GB as float32) to a .npy, trains on it with ``pyrovae train`` in a
subprocess, and samples ``RssAnon`` (/proc/PID/status: private anonymous
pages; not RSS, which also counts the memory-mapped file's page cache) of the
training process and of each DataLoader worker every 0.2 s. Prints the peak
of each process and the peak of their sum as JSON; deletes the array.

    python benchmarks/data_memory.py --n 200000 --num-workers 2 -- --epochs 1 ...
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np


def rss_anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


def write_array(path: str, n: int, chunk: int = 10_000) -> None:
    """The array written in chunks through a memory map, so making it costs no
    anonymous memory either."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 32, 32, 3))
    rng = np.random.default_rng(0)
    for i in range(0, n, chunk):
        out[i : i + chunk] = rng.integers(0, 256, (min(chunk, n - i), 32, 32, 3), dtype=np.uint8)
    out.flush()
    del out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--folder", default=tempfile.gettempdir())
    parser.add_argument("train_args", nargs="*", help="more `pyrovae train vae` arguments (after --)")
    args = parser.parse_args()
    # A SIGTERM (e.g. from `timeout`) unwinds through the finally below, so the array is deleted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    path = os.path.join(args.folder, f"pyrovae-memory-{os.getpid()}.npy")
    try:
        write_array(path, args.n)
        with tempfile.TemporaryDirectory() as out:
            cmd = [
                sys.executable,
                "-m",
                "pyrovae",
                "train",
                "vae",
                "--data",
                path,
                "--num-workers",
                str(args.num_workers),
                "--out",
                out,
                "--quiet",
                *args.train_args,
            ]
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd)
            try:
                peak_main, peak_worker, peak_sum, samples = 0, 0, 0, 0
                while proc.poll() is None:
                    main_kb = rss_anon_kb(proc.pid)
                    workers = [rss_anon_kb(c) for c in children(proc.pid)]
                    peak_main, peak_worker = max(peak_main, main_kb), max([peak_worker, *workers])
                    peak_sum = max(peak_sum, main_kb + sum(workers))
                    samples += 1
                    time.sleep(0.2)
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait()
            seconds = time.perf_counter() - t0
            with open(os.path.join(out, "metrics.csv")) as f:
                last = f.read().strip().splitlines()[-1]
        print(
            json.dumps(
                {
                    "n": args.n,
                    "bytes_on_disk": os.path.getsize(path) if os.path.exists(path) else None,
                    "num_workers": args.num_workers,
                    "returncode": proc.returncode,
                    "seconds": round(seconds, 1),
                    "samples": samples,
                    "peak_rss_anon_mb": {
                        "main": peak_main / 1024,
                        "worker": peak_worker / 1024,
                        "sum": peak_sum / 1024,
                    },
                    "last_metrics_row": last,
                    "command": " ".join(cmd),
                },
                indent=2,
            )
        )
    finally:
        if os.path.exists(path):
            os.unlink(path)


if __name__ == "__main__":
    main()
