"""The devices of a Ray cluster, as `pykernels fleet` measures them.

A node offers devices in one of two ways:
- declared: custom resources named `pk_device:SPEC`, one per device (`ray start --resources
  '{"pk_device:cpu+threads=8": 1}'`). SPEC is a torch device (`cpu`, `cuda:1`, a plugin's device type)
  followed by `+key=value` options: `threads=N` (OMP_NUM_THREADS of the run), `backend=NAME` (repeatable:
  only these backends on that device, e.g. a plugin's), `tag=TEXT` (part of the device's machine id and
  label, for devices that would otherwise look alike). No commas: Ray passes resources to its raylet as a
  comma-separated list, and a comma in a name breaks the node's start.
- otherwise, found: one CPU device when the node has CPU resources (a head started with `--num-cpus 0`
  offers none, the Ray idiom for "no work on the head") and one device per GPU of its `GPU` resource.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

PREFIX = "pk_device:"
_SPEC_KEYS = ("threads", "backend", "tag")


class DeviceSpecError(ValueError):
    """A `pk_device:` resource or --local-device that cannot be read; the message names it."""


@dataclass
class Device:
    key: str                      # unique in the fleet, stable across runs: the run directory's name
    node_id: str
    host: str
    device: str                   # torch device given to `pykernels bench --device`
    threads: int | None = None    # OMP_NUM_THREADS of the run; None = all the node's cores
    backends: list[str] = field(default_factory=list)  # empty: the fleet's --backend list
    tag: str | None = None
    resource: str | None = None   # the declared resource the task asks for
    gpus: int = 0                 # GPUs the task holds (all the node's: one GPU run at a time per node)
    gpu_index: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def parse_spec(spec: str) -> dict:
    """'cpu+threads=2+tag=x' -> {'device': 'cpu', 'threads': 2, 'backends': [], 'tag': 'x'}."""
    if not isinstance(spec, str) or not spec.strip():
        raise DeviceSpecError("device spec: empty")
    if "," in spec:
        raise DeviceSpecError(f"device spec {spec!r}: no commas (Ray splits resource lists on them); "
                              "use '+' between options: cpu+threads=2+tag=x")
    head, *opts = spec.split("+")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(:[0-9]+)?", head):
        raise DeviceSpecError(f"device spec {spec!r}: {head!r} is not a torch device (cpu, cuda:1, ...)")
    out = {"device": head, "threads": None, "backends": [], "tag": None}
    for o in opts:
        k, eq, v = o.partition("=")
        if not eq or k not in _SPEC_KEYS or not v:
            raise DeviceSpecError(f"device spec {spec!r}: option {o!r} is not one of "
                                  f"{', '.join(k + '=...' for k in _SPEC_KEYS)}")
        if k == "threads":
            if not v.isdigit() or int(v) < 1:
                raise DeviceSpecError(f"device spec {spec!r}: threads must be a positive integer, got {v!r}")
            out["threads"] = int(v)
        elif k == "backend":
            out["backends"].append(v)
        else:
            out["tag"] = v
    return out


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=@-]+", "_", text)


def discover(nodes: list[dict]) -> list[Device]:
    """The devices of the alive nodes of `ray.nodes()`, in a stable order (host, then node id)."""
    devs: list[Device] = []
    alive = sorted((n for n in nodes if n.get("Alive")),
                   key=lambda n: (n.get("NodeManagerHostname", ""), n.get("NodeManagerAddress", ""), n["NodeID"]))
    for n in alive:
        res = n.get("Resources") or {}
        host = n.get("NodeManagerHostname") or n.get("NodeManagerAddress") or n["NodeID"][:8]
        declared = sorted(r for r in res if r.startswith(PREFIX))
        if declared:
            for r in declared:
                s = parse_spec(r[len(PREFIX):])
                devs.append(Device(key=f"{r[len(PREFIX):]}@{host}", node_id=n["NodeID"], host=host,
                                   device=s["device"], threads=s["threads"], backends=s["backends"], tag=s["tag"],
                                   resource=r))
            continue
        if res.get("CPU", 0) > 0:
            devs.append(Device(key=f"cpu@{host}", node_id=n["NodeID"], host=host, device="cpu"))
        ngpu = int(res.get("GPU", 0))
        for i in range(ngpu):
            devs.append(Device(key=f"cuda{i}@{host}", node_id=n["NodeID"], host=host, device=f"cuda:{i}",
                               gpus=ngpu, gpu_index=i))
    seen: dict[str, int] = {}
    for d in devs:  # two nodes on one host offering the same device: keep both, apart
        d.key = safe_name(d.key)
        seen[d.key] = seen.get(d.key, 0) + 1
        if seen[d.key] > 1:
            d.key = f"{d.key}-{seen[d.key]}"
    return devs
