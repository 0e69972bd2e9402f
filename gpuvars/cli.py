"""Command line: ``python -m gpuvars {inspect,verify,export,devices,demo,launch}``.

``inspect`` is TF's inspect_checkpoint (print_tensors_in_checkpoint_file) for gpuvars
checkpoints, plain .safetensors files and Hugging Face sharded folders (their
``model.safetensors.index.json``); ``verify`` checks every checksum of every file the
index lists (data or its shards, replica files, device map) and exits non-zero on damage;
``export`` writes a checkpoint as a Hugging Face sharded folder. Damage
of any kind, an I/O error or a lack of memory prints ``error: ...`` and exits 1, never a
traceback.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from gpuvars.errors import GpuvarsError


def _inspect(args: argparse.Namespace) -> int:
    from gpuvars.checkpoint import _stformat as st
    from gpuvars.checkpoint.reader import CheckpointReader

    with CheckpointReader(args.prefix) as ckpt:  # each file opened once, for every tensor
        devices = ckpt.get_variable_to_device_map()
        dtypes = ckpt.get_variable_to_dtype_map()
        rows = [(k, st.st_dtype(dtypes[k]), s, devices.get(k, "")) for k, s in ckpt.get_variable_to_shape_map().items()]
        if ckpt.plain and ckpt.prefix.endswith(".json"):
            header = (f"# safetensors sharded index {ckpt.prefix} ({len(ckpt.data_files)} shard(s); "
                      "no checksums, no devices)")
        elif ckpt.plain:
            header = f"# plain safetensors file {ckpt.prefix} (no checksums, no devices)"
        else:
            step = "" if ckpt.global_step is None else f", global_step {ckpt.global_step}"
            shards = f", {len(ckpt.data_files)} shards" if len(ckpt.data_files) > 1 else ""
            header = f"# checkpoint {ckpt.prefix} (policy {ckpt.policy}{step}{shards})"
        if args.tensor is not None:
            if not ckpt.has_tensor(args.tensor):
                print(f"error: Key {args.tensor} not found in checkpoint {ckpt.prefix}", file=sys.stderr)
                return 1
            print(f"tensor_name:  {args.tensor}")
            print(np.array2string(ckpt.get_tensor(args.tensor), threshold=args.threshold))
            return 0
        print(header)
        for key, dtype, shape, device in rows:
            if args.all:
                print(f"tensor_name:  {key}")
                print(np.array2string(ckpt.get_tensor(key), threshold=args.threshold))
            else:
                where = f" {device}" if device else ""
                print(f"{key} ({dtype}) [{','.join(map(str, shape))}]{where}")
    total = sum(math.prod(shape) for _, _, shape, _ in rows)  # Python ints: any size, no overflow
    print(f"# Total number of params: {total}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from gpuvars.checkpoint.reader import CheckpointReader

    with CheckpointReader(args.prefix) as reader:
        bad = reader.verify()
    if bad:
        print(f"DAMAGED: {reader.prefix}: checksum failed for {', '.join(bad)}", file=sys.stderr)
        return 1
    if reader.plain:
        what = "sharded safetensors index" if reader.prefix.endswith(".json") else "plain safetensors file"
        print(f"ok: {reader.prefix}: {what}, structure valid ({len(reader.keys())} tensors; it has no checksums)")
    else:
        print(f"ok: {reader.prefix}: {len(reader.keys())} tensors verified")
    return 0


def _export(args: argparse.Namespace) -> int:
    import os

    from gpuvars.checkpoint.export import export_hf
    from gpuvars.checkpoint.reader import CheckpointReader

    index = export_hf(args.prefix, args.out_dir, max_shard_size=args.max_shard_size)
    with CheckpointReader(index) as exported:
        count, shards = len(exported.keys()), len(exported.data_files)
    print(f"exported {args.prefix} to {os.path.dirname(index) or '.'}: {count} tensors in {shards} shard(s), "
          f"index {os.path.basename(index)}")
    return 0


def _devices(args: argparse.Namespace) -> int:
    import gpuvars_backends as backends
    from gpuvars import config
    from gpuvars.placement import list_devices

    print("\n".join(list_devices()))
    for library in ("cupy", "jax"):
        probe = backends.probe(library, "gpu")
        print(f"# {library} GPU: {probe.count} device(s)" + (f" ({probe.reason})" if probe.reason else ""))
    print(f"# CPU backend: {config.get_cpu_backend()}; GPU backend: {config.get_gpu_backend() or 'auto'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from gpuvars.demo import main as demo_main

        return demo_main(argv[1:])
    if argv and argv[0] == "launch":  # its script's own arguments follow: parsed by the launcher
        from gpuvars.distributed.launch import main as launch_main

        return launch_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m gpuvars", description="gpuvars command line")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="list a checkpoint's tensors (TF's inspect_checkpoint)")
    p.add_argument("prefix", help="checkpoint prefix, a plain .safetensors file, or an HF sharded folder / its index")
    p.add_argument("--tensor", help="print this tensor's value")
    p.add_argument("--all", action="store_true", help="print every tensor's value")
    p.add_argument("--threshold", type=int, default=1000, help="numpy print threshold")
    p.set_defaults(fn=_inspect)
    p = sub.add_parser("verify", help="check every checksum; exit 1 on damage")
    p.add_argument("prefix")
    p.set_defaults(fn=_verify)
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face sharded folder")
    p.add_argument("prefix", help="checkpoint prefix (or a .safetensors file, or an HF folder)")
    p.add_argument("out_dir", help="the folder to write model-0000K-of-0000N.safetensors and its index into")
    p.add_argument("--max-shard-size", default="5GB",
                   help="most tensor bytes per shard: bytes or e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.set_defaults(fn=_export)
    p = sub.add_parser("devices", help="list this process's devices and GPU probes")
    p.set_defaults(fn=_devices)
    sub.add_parser("demo", help="train, checkpoint, restart and resume (the main job)")
    sub.add_parser("launch", help="run a script in N local processes: launch -n N [--port P] [--timeout S] script.py ...")
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args))
    except (GpuvarsError, OSError, MemoryError) as exc:  # damage, I/O, memory: a message, never a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
