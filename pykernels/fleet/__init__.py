"""`pykernels fleet`: one sweep on every device of a Ray cluster, one cross-hardware report.

    pykernels fleet [--address auto|ray://HOST:10001] [--local-device SPEC]... [--sweep ...|--shape ...|--model ...]
                    [--backend NAME]... [--kernel F]... [--dtype DT]... [--out DIR] [--resume]
                    [--case-timeout S] [--device-timeout S] [--only KEY]...

A subcommand of `pykernels` rather than `pytest --benchmark --fleet`: the fleet's driver runs no tests
itself: it schedules one ordinary `pykernels bench` per device (same plugin, timing, journal and result
fields) and merges their files; inside pytest it would be a session that collects nothing.

Devices: see pykernels/fleet/devices.py. Ray is optional (`pip install "pykernels[fleet]"`); without it the
subcommand says so and exits 2.
"""

from __future__ import annotations

from pathlib import Path

from .devices import Device, DeviceSpecError, discover, parse_spec
from .driver import FleetError, FleetOptions, merge, ray_problem, run_fleet

__all__ = ["Device", "DeviceSpecError", "FleetError", "FleetOptions", "add_parser", "discover", "merge",
           "parse_spec", "ray_problem", "run_fleet"]

# fleet option -> `pykernels bench` option (value options; repeatable ones are lists)
_PASS = ("sweep", "shape", "model", "model_prompt", "model_context", "model_batch", "backend", "kernel", "dtype",
         "time_budget")


def add_parser(sub):
    p = sub.add_parser(
        "fleet", help="run a sweep on every device of a Ray cluster and merge one cross-hardware report",
        description="Connect to a Ray cluster (or start a local one), find each node's devices (its CPU, its GPUs, "
                    "devices declared as custom resources pk_device:SPEC), run the sweep once per device as a Ray "
                    "task pinned to its node (the ordinary `pykernels bench` in a subprocess there), stream every "
                    "finished case back into the run directory and merge the results into one report. Needs "
                    "ray: pip install 'pykernels[fleet]'.",
        epilog="Exit status: 0 every device finished and every case passed; 1 a device or case failed (finished "
               "cases are kept: --resume completes the run); 2 usage error or ray unavailable.")
    p.add_argument("--address", default=None,
                   help="Ray cluster: 'auto' (the cluster of `ray start` on this machine), 'HOST:6379', or "
                        "'ray://HOST:10001' (Ray client); default: start a local cluster for this run")
    p.add_argument("--local-device", action="append", default=[], metavar="SPEC",
                   help="without --address: a device of the local cluster (repeatable), e.g. cpu+threads=1, "
                        "cpu+threads=2, cpu+tag=x+backend=example_torch; default: this machine's CPU and GPUs")
    g = p.add_argument_group("the sweep (as `pykernels bench`)")
    g.add_argument("--sweep", choices=("smoke", "quick", "full"), default=None, help="shape sweep (default quick)")
    g.add_argument("--shape", action="append", default=[], metavar="K=V,...", help="instead of --sweep: this shape")
    g.add_argument("--model", default=None, metavar="NAME|FILE", help="instead of --sweep: a model's kernel shapes")
    g.add_argument("--model-prompt", type=int, default=None, metavar="P")
    g.add_argument("--model-context", type=int, default=None, metavar="L")
    g.add_argument("--model-batch", type=int, default=None, metavar="B")
    g.add_argument("--backend", action="append", default=[], metavar="NAME", help="only this backend (repeatable)")
    g.add_argument("--kernel", action="append", default=[], choices=("gemm", "attention", "decode"))
    g.add_argument("--dtype", action="append", default=[], metavar="DTYPE")
    g.add_argument("--time-budget", type=float, default=None, metavar="S", help="seconds of timing per case")
    p.add_argument("--out", type=Path, default=None,
                   help="run directory (default ./fleet-<UTC time>); with --resume the run to complete")
    p.add_argument("--resume", action="store_true",
                   help="complete the run in --out: finished devices are kept, the others re-run only the cases "
                        "their journal lacks")
    p.add_argument("--case-timeout", type=float, default=900.0, metavar="S",
                   help="a case running longer is killed and reported failed; the sweep goes on (default 900)")
    p.add_argument("--device-timeout", type=float, default=None, metavar="S",
                   help="a device's whole sweep running longer is cancelled and reported failed")
    p.add_argument("--only", action="append", default=[], metavar="TEXT",
                   help="only the devices whose key contains TEXT (repeatable)")
    p.add_argument("pytest_args", nargs="*", default=[],
                   help="after --: more pytest arguments for every device's `pykernels bench`")
    p.set_defaults(func=cmd_fleet)


def bench_args(args) -> list[str]:
    """The `pykernels bench` options of the fleet's sweep options."""
    out: list[str] = []
    for k in _PASS:
        v = getattr(args, k, None)
        if v is None or v == []:
            continue
        for x in v if isinstance(v, list) else [v]:
            out += [f"--{k.replace('_', '-')}", str(x)]
    extra = [a for a in (getattr(args, "pytest_args", None) or []) if a != "--"]
    return out + (["--", *extra] if extra else [])


def cmd_fleet(args) -> int:
    from ..cli import CliError
    from .driver import command_line, default_out

    why = ray_problem()
    if why:
        raise CliError(f"unavailable: {why}")
    if args.resume and args.out is None:
        raise CliError("--resume needs --out DIR (the fleet run to complete)")
    for name, v in (("--case-timeout", args.case_timeout), ("--device-timeout", args.device_timeout)):
        if v is not None and v <= 0:
            raise CliError(f"{name} must be positive, got {v:g}")
    opts = FleetOptions(bench_args=bench_args(args), out=args.out or default_out(), address=args.address,
                        local_devices=args.local_device, resume=args.resume, case_timeout=args.case_timeout,
                        device_timeout=args.device_timeout, only=args.only, command=command_line(),
                        echo=lambda s: print(s, flush=True))
    try:
        return run_fleet(opts)["rc"]
    except FleetError as e:
        raise CliError(str(e)) from None
