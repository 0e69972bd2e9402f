"""Which checksum may gpuvars afford per tensor? (DESIGN.md, Decision 13)

Verification must cost under a fifth of a warm restore, so every candidate is timed
single-threaded on one warm buffer next to the two baselines a restore is made of:
a numpy copy (memcpy speed) and a ``readinto`` of the same bytes from the page cache.
Each figure is the median of ``--repeat`` runs over a prefaulted buffer.

The kernel's copy out of the page cache is much slower when the destination is not
cache-line aligned relative to the file offset; numpy's large arrays start 16 bytes
into a page, so reads are timed at both relative alignments, plain and with the
checksum fused in (preadv of each chunk, then hash it while it is in cache, as the
gpuvars reader does).

Usage::

    python bench/bench_checksums.py [--mib 256] [--repeat 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import tempfile
import time
import types
import zlib
from collections.abc import Callable

import numpy as np

xxhash: types.ModuleType | None
try:
    import xxhash
except ImportError:
    xxhash = None


def _candidates() -> dict[str, Callable[..., object]]:
    """Checksum name -> one-shot function over a buffer; missing libraries are skipped."""
    found: dict[str, Callable[..., object]] = {
        "zlib.crc32": zlib.crc32,
        "zlib.adler32": zlib.adler32,
    }
    try:
        import google_crc32c

        found["google-crc32c"] = google_crc32c.value
    except ImportError:
        print("skip google-crc32c (pip install google-crc32c)")
    try:
        import crc32c

        found["crc32c"] = crc32c.crc32c
    except ImportError:
        print("skip crc32c (pip install crc32c)")
    if xxhash is not None:
        found["xxhash.xxh64"] = xxhash.xxh64_intdigest
        found["xxhash.xxh3_64"] = xxhash.xxh3_64_intdigest
        found["xxhash.xxh3_128"] = xxhash.xxh3_128_intdigest
    else:
        print("skip xxhash (pip install xxhash)")
    return found


def _median_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()  # one untimed warm-up run: caches, lazy imports, CPU frequency
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="buffer size in MiB")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per row")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    nbytes = args.mib << 20

    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, size=nbytes, dtype=np.uint8)  # written = prefaulted
    dst = np.ones(nbytes + 8192, np.uint8)  # prefaulted as well: no timing pays page faults

    def at(rel: int) -> np.ndarray:
        """``nbytes`` of dst whose address is ``rel`` bytes past a page boundary."""
        start = (rel - dst.ctypes.data) % 4096
        return dst[start:start + nbytes]

    rows: dict[str, float] = {}
    rows["memcpy (np.copyto)"] = _median_seconds(lambda: np.copyto(at(16), src), args.repeat)

    with tempfile.NamedTemporaryFile() as tmp:
        tmp.write(src.data)
        tmp.flush()
        raw = open(tmp.name, "rb", buffering=0)  # unbuffered: readinto goes straight to dst

        def readinto(rel: int) -> None:
            raw.seek(0)
            got = raw.readinto(at(rel).data)
            assert got == nbytes, got

        def read_hashed(rel: int, chunk: int = 2 << 20) -> None:
            assert xxhash is not None
            hasher, view = xxhash.xxh3_64(), at(rel).data
            for off in range(0, nbytes, chunk):
                part = view[off:off + chunk]
                assert os.preadv(raw.fileno(), [part], off) == len(part)
                hasher.update(part)

        with raw:
            readinto(0)  # pull the file into the page cache before timing
            for rel in (0, 16):
                rows[f"readinto, dst +{rel}"] = _median_seconds(functools.partial(readinto, rel), args.repeat)
            if xxhash is not None:
                for rel in (0, 16):
                    rows[f"read+xxh3_64, dst +{rel}"] = _median_seconds(
                        functools.partial(read_hashed, rel), args.repeat)

    for name, fn in _candidates().items():
        # the ndarray itself: google-crc32c refuses a memoryview, every library takes an array
        rows[name] = _median_seconds(functools.partial(fn, src), args.repeat)

    memcpy = rows["memcpy (np.copyto)"]
    readin = rows["readinto, dst +0"]  # the faster read: the stricter baseline
    print(f"\n{args.mib} MiB warm buffer, median of {args.repeat}, single thread, "
          f"{platform.machine()} {platform.python_version()} numpy {np.__version__}; "
          "dst +K: destination K bytes past a page boundary, file offset 0\n")
    print(f"| {'operation':<22} | {'GB/s':>6} | {'ms':>7} | {'time / memcpy':>13} | {'time / readinto':>15} |")
    print(f"|{'-' * 24}|{'-' * 7}:|{'-' * 8}:|{'-' * 14}:|{'-' * 16}:|")
    for name, sec in rows.items():
        print(f"| {name:<22} | {nbytes / sec / 1e9:6.2f} | {sec * 1e3:7.1f} | "
              f"{sec / memcpy:13.2f} | {sec / readin:15.2f} |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"bytes": nbytes, "repeat": args.repeat,
                       "seconds": rows, "gb_per_s": {k: nbytes / v / 1e9 for k, v in rows.items()}},
                      out, indent=2)


if __name__ == "__main__":
    main()
