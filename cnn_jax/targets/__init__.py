"""Accelerators to compile for without having one: compile-only JAX devices of a named target.

  target = targets.get("tpu-v5e:2x2")          # UserError listing the known names otherwise
  targets.check_requirements(target)           # UserError naming requirements-compile.txt if a package is missing
  devices = targets.devices(target)            # compile-only jax.Device objects (nothing can run on them)
  mesh = Mesh(np.asarray(devices), ("data",))  # then jax.jit(...).lower(<ShapeDtypeStructs>).compile()

XLA compiles for a GPU or TPU that is not there: `jax.experimental.topologies.get_topology_desc` gives devices
of a "compile-only" client, for which `jit(...).lower(...).compile()` runs the real XLA:GPU or XLA:TPU compiler
on this CPU (memory_analysis(), cost_analysis() and as_text() of the executable work; running it does not).

  GPU  the jax-cuda13-plugin (XLA:GPU) with a CUDA 13 `ptxas` and an XLA `GpuTargetConfigProto` text naming
       the device (h100_sxm.txtpb, h200.txtpb here; README.md says where they come from). `h100:8` is 8 GPUs
       of one host (topology 1x1x8).
  TPU  libtpu (the version jax[tpu] pins for this jax). The topology name is libtpu's (`v5e:2x2` is 4 chips
       of one host, `v5e:4x4` 16 chips of 4 hosts: a multi-process slice, its processes' devices in one mesh).
       v4 is compiled as the megacore chips live v4 hosts have (one device per chip), v5p and v6e with the
       chip configuration live hosts use (`megachip_tccontrol`), as JAX's own AOT tests do.

Memory per device: GPUs from their target description (`device_memory_size`), TPUs from the vendor's HBM per
chip. The packages are in requirements-compile.txt, not requirements.txt: they are ~1.1 GB and training does
not need them.
"""

import dataclasses
import importlib.util
import os
import re
import shutil
from typing import Any, Dict, List, Optional, Tuple

from cnn_jax.errors import UserError

REQUIREMENTS = "requirements-compile.txt"
_HERE = os.path.dirname(os.path.abspath(__file__))
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Target:
  """A named accelerator configuration to compile for.

  name: what --target takes; platform: 'cuda' or 'tpu'; topology: the topology string of
  get_topology_desc ('1x1xN' for GPUs, libtpu's name for TPUs); kwargs: further get_topology_desc arguments
  (TPU chip configuration); memory_bytes: memory of one device; kind: a short description;
  accelerator_type: the Cloud TPU accelerator type of the slice (given to libtpu so it does not ask the
  environment for one); target_config: the GPU target description file (in this folder).
  """
  name: str
  platform: str
  topology: str
  memory_bytes: int
  kind: str
  kwargs: Tuple[Tuple[str, Any], ...] = ()
  accelerator_type: Optional[str] = None
  target_config: Optional[str] = None

  @property
  def is_gpu(self) -> bool:
    return self.platform == "cuda"

  @property
  def is_tpu(self) -> bool:
    return self.platform == "tpu"


def _gpu_memory(txtpb: str) -> int:
  with open(os.path.join(_HERE, txtpb)) as f:
    match = re.search(r"device_memory_size:\s*(\d+)", f.read())
  return int(match.group(1))


# TPU HBM per chip (vendor figures): v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB.
_TPUS = {
    # name: (topology, HBM GiB, description, accelerator type, chip config)
    "tpu-v4:2x2x1": ("v4:2x2x1", 32, "TPU v4, 4 chips, 1 host", "v4-8", "megacore"),
    "tpu-v4:4x4x4": ("v4:4x4x4", 32, "TPU v4, 64 chips, 16 hosts", "v4-128", "megacore"),
    "tpu-v5e:2x2": ("v5e:2x2", 16, "TPU v5e, 4 chips, 1 host", "v5litepod-4", None),
    "tpu-v5e:4x4": ("v5e:4x4", 16, "TPU v5e, 16 chips, 4 hosts", "v5litepod-16", None),
    "tpu-v5p:2x2x1": ("v5p:2x2x1", 95, "TPU v5p, 4 chips, 1 host", "v5p-8", "megachip_tccontrol"),
    "tpu-v6e:2x2": ("v6e:2x2", 32, "TPU v6e, 4 chips, 1 host", "v6e-4", "megachip_tccontrol"),
    "tpu-v6e:4x4": ("v6e:4x4", 32, "TPU v6e, 16 chips, 4 hosts", "v6e-16", "megachip_tccontrol"),
}
_GPUS = {
    # name: (target description, description)
    "h100": ("h100_sxm.txtpb", "NVIDIA H100 SXM"),
    "h200": ("h200.txtpb", "NVIDIA H200"),
}
_MAX_GPUS_PER_HOST = 8


def names() -> List[str]:
  """The target names --target takes (GPUs also as NAME:N, N GPUs of one host)."""
  return list(_GPUS) + [f"{g}:{_MAX_GPUS_PER_HOST}" for g in _GPUS] + list(_TPUS)


def get(name: str) -> Target:
  """The Target called `name`; UserError listing the known ones for anything else."""
  name = (name or "").strip()
  base, _, count = name.partition(":")
  if base in _GPUS and (not count or (count.isdigit() and 1 <= int(count) <= _MAX_GPUS_PER_HOST)):
    txtpb, kind = _GPUS[base]
    n = int(count or 1)
    return Target(name=name, platform="cuda", topology=f"1x1x{n}", memory_bytes=_gpu_memory(txtpb),
                  kind=f"{n} x {kind}", target_config=txtpb)
  if name in _TPUS:
    topology, gib, kind, accelerator_type, chip_config = _TPUS[name]
    kwargs = (("chip_config_name", chip_config),) if chip_config else ()
    return Target(name=name, platform="tpu", topology=topology, memory_bytes=gib * GIB, kind=kind,
                  kwargs=kwargs, accelerator_type=accelerator_type)
  raise UserError(f"unknown --target={name!r}; known: {', '.join(names())} (GPUs: NAME:N for N GPUs of one "
                  f"host, N <= {_MAX_GPUS_PER_HOST})")


def _ptxas() -> Optional[str]:
  """The ptxas XLA:GPU will run: the nvidia-cuda-nvcc wheel's (XLA looks there first), else one on the PATH."""
  spec = importlib.util.find_spec("nvidia")
  for root in (list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []):
    for sub in ("cu13", "cuda_nvcc"):
      path = os.path.join(root, sub, "bin", "ptxas")
      if os.path.isfile(path):
        return path
  return shutil.which("ptxas")


def missing_requirements(target: Target) -> List[str]:
  """What compiling for `target` lacks, as package names of requirements-compile.txt ([] when nothing)."""
  if target.is_tpu:
    return [] if importlib.util.find_spec("libtpu") is not None else ["libtpu"]
  missing = []
  try:
    plugin = importlib.util.find_spec("jax_plugins.xla_cuda13")
  except ModuleNotFoundError:
    plugin = None
  if plugin is None:
    missing += ["jax-cuda13-plugin", "jax-cuda13-pjrt"]
  if _ptxas() is None:
    missing.append("nvidia-cuda-nvcc (a CUDA 13 ptxas)")
  return missing


def check_requirements(target: Target) -> None:
  """UserError (one line, naming requirements-compile.txt) when a package the target needs is missing."""
  missing = missing_requirements(target)
  if missing:
    raise UserError(f"compiling for {target.name} needs the extra packages of {REQUIREMENTS} "
                    f"({', '.join(missing)} not installed): pip install -r {REQUIREMENTS}")


# libtpu reads these when it starts; without them it prints warnings about the TPU it cannot find (it
# still compiles). They are set only while it starts, so nothing else in the process sees them.
def _libtpu_environment(target: Target) -> Dict[str, str]:
  return {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
          "TPU_ACCELERATOR_TYPE": target.accelerator_type or ""}


_DEVICES: Dict[str, list] = {}


def devices(target: Target) -> list:
  """The compile-only devices of `target`, in the topology's order (memoised per target name).

  Needs JAX's backends to be the host CPU's only (JAX_PLATFORMS=cpu, as cnn_jax.compile_check sets): with the
  CUDA plugin installed and no GPU, JAX's start-up would otherwise try to open one and print a traceback.
  """
  if target.name in _DEVICES:
    return _DEVICES[target.name]
  check_requirements(target)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if target.is_gpu:
    with open(os.path.join(_HERE, target.target_config)) as f:
      text = f.read()
    topo = topologies.get_topology_desc(platform="cuda", topology=target.topology, target_config=text)
  else:
    saved = {k: os.environ.get(k) for k in _libtpu_environment(target)}
    os.environ.update({k: v for k, v in _libtpu_environment(target).items() if os.environ.get(k) is None})
    try:
      topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology, **dict(target.kwargs))
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v
  _DEVICES[target.name] = list(topo.devices)
  return _DEVICES[target.name]
