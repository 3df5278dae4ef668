"""Reading an optimised HLO module (`compiled.as_text()`): which kernels a GPU program launches, which collectives
a TPU program runs.

The text is XLA's HLO dump: computations `%name (params) -> shape {` ... `}` (ENTRY marks the entry), one
instruction a line, `%x = shape opcode(operands), attr=..., metadata={op_name="jit(f)/..."}`. Fusion
computations (`calls=%c` of a fusion) hold the fused ops; everything else runs on the device as one kernel or
library call per instruction.

GPU: every launched instruction is classified by what it is (a cuDNN convolution custom-call, a cuBLAS or
Triton matmul, a transpose or copy that only moves data between layouts, another fusion), and the
convolutions of the JAX program (metadata op_name containing `conv_general_dilated`) by how they were
lowered. TPU: collectives (all-reduce, all-gather, reduce-scatter, collective-permute, all-to-all) by kind with
their bytes per device.
"""

import collections
import dataclasses
import re
from typing import Dict, List, Optional, Tuple

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5, "s2": 0.25, "u2": 0.25}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->\s*.*\{\s*$")
_NOT_KERNELS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
                "replica-id", "add-dependency", "opt-barrier", "domain", "iota"}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all",
               "collective-broadcast", "ragged-all-to-all")


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string (a tuple: the sum of its arrays); layouts and tiling are ignored."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in _BYTES and not dtype.startswith("f8"):
      continue
    n = 1
    for d in dims.split(","):
      if d:
        n *= int(d)
    total += n * _BYTES.get(dtype, 1)
  return int(total)


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str
  opcode: str
  rest: str          # operands and attributes
  computation: str
  root: bool

  @property
  def operands(self) -> List[str]:
    depth, end = 0, len(self.rest)
    for i, ch in enumerate(self.rest):
      if ch in "([{":
        depth += 1
      elif ch in ")]}":
        if depth == 0:
          end = i
          break
        depth -= 1
    return re.findall(r"%([\w.\-]+)", self.rest[:end])

  def attr(self, key: str) -> Optional[str]:
    match = re.search(key + r'=("(?:[^"\\]|\\.)*"|%?[\w.\-$]+)', self.rest)
    return match.group(1).strip('"').lstrip("%") if match else None

  @property
  def op_name(self) -> str:
    match = re.search(r'op_name="([^"]*)"', self.rest)
    return match.group(1) if match else ""


@dataclasses.dataclass
class Module:
  computations: Dict[str, List[Instruction]]
  entry: str

  @property
  def instructions(self) -> Dict[str, Instruction]:
    return {i.name: i for body in self.computations.values() for i in body}


def parse(text: str) -> Module:
  """The computations and instructions of an HLO module's text."""
  computations: Dict[str, List[Instruction]] = {}
  entry, current = "", None
  for line in text.splitlines():
    if current is None:
      match = _HEADER.match(line.strip())
      if match:
        current = match.group(2)
        computations[current] = []
        if match.group(1):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    match = _INSTRUCTION.match(line)
    if match:
      computations[current].append(Instruction(match.group(2), match.group(3), match.group(4), match.group(5),
                                               current, bool(match.group(1))))
  return Module(computations, entry)


def _fused(module: Module) -> Dict[str, str]:
  """{fusion computation: its root's opcode (through bitcasts)} of every computation some fusion calls."""
  out = {}
  for body in module.computations.values():
    for ins in body:
      if ins.opcode == "fusion":
        called = ins.attr("calls")
        if called and called in module.computations:
          out[called] = _root_opcode(module, called)
  return out


def _root_opcode(module: Module, computation: str) -> str:
  body = module.computations[computation]
  by_name = {i.name: i for i in body}
  root = next((i for i in body if i.root), body[-1] if body else None)
  while root is not None and root.opcode in ("bitcast", "tuple") and root.operands:
    if root.opcode == "tuple":
      break
    root = by_name.get(root.operands[0])
  return root.opcode if root is not None else ""


def _executed(module: Module) -> List[str]:
  """Computations whose instructions are launched (the entry, loop bodies, branches, called computations), not
  fusion bodies or reducers."""
  fused = set(_fused(module))
  reducers = {i.attr("to_apply") for body in module.computations.values() for i in body if i.attr("to_apply")}
  return [c for c in module.computations if c not in fused and c not in reducers]


@dataclasses.dataclass
class GpuKernels:
  """What a GPU program launches: counts by class, the cuDNN custom-calls by target, the convolutions of the
  JAX program by lowering, the layout kernels (transposes, copies into another layout) with their bytes, and the
  copies that keep the layout (a buffer copied so that an in-place op, e.g. a scatter, can write into it)."""
  cudnn_calls: Dict[str, int]
  conv_lowering: Dict[str, int]
  kernels: Dict[str, int]
  layout_kernels: int
  layout_bytes: int
  layout_next_to_conv: int
  largest_layout: List[Tuple[str, str, int]]
  buffer_copies: int = 0
  buffer_copy_bytes: int = 0


def _kernel_class(ins: Instruction, fused_roots: Dict[str, str]) -> str:
  if ins.opcode == "custom-call":
    target = ins.attr("custom_call_target") or ""
    if target.startswith("__cudnn$conv"):
      return "cudnn conv"
    if "cublas" in target or "gemm" in target.lower() or "matmul" in target.lower():
      return "cublas matmul"
    return f"custom-call {target}"
  if ins.opcode == "fusion":
    if "__triton_gemm" in ins.rest or '"kind":"__triton' in ins.rest and "gemm" in ins.rest:
      return "triton matmul"
    if "__cudnn" in ins.rest:
      return "cudnn fusion"
    root = fused_roots.get(ins.attr("calls") or "", "")
    if root in ("transpose", "copy"):
      return "layout (transpose/copy)"
    return "fusion"
  if ins.opcode in ("transpose", "copy"):
    return "layout (transpose/copy)"
  if ins.opcode == "convolution":
    return "convolution (XLA kernel)"
  if ins.opcode in ("dot",):
    return "dot (XLA kernel)"
  for c in COLLECTIVES:
    if ins.opcode.startswith(c):
      return "collective"
  return ins.opcode


def gpu_kernels(text: str) -> GpuKernels:
  """GpuKernels of an XLA:GPU program's optimised HLO text."""
  module = parse(text)
  fused_roots = _fused(module)
  by_name = module.instructions
  cudnn = collections.Counter()
  lowering = collections.Counter()
  kernels = collections.Counter()
  layout: List[Instruction] = []
  conv_names = set()
  for comp in _executed(module):
    for ins in module.computations[comp]:
      if ins.opcode in _NOT_KERNELS or ins.opcode.endswith("-done"):
        continue
      cls = _kernel_class(ins, fused_roots)
      if ins.opcode == "copy" and _same_layout(ins, by_name):
        cls = "buffer copy"
      kernels[cls] += 1
      if cls == "cudnn conv":
        cudnn[ins.attr("custom_call_target")] += 1
        conv_names.add(ins.name)
      if cls.startswith("layout"):
        layout.append(ins)
      if "conv_general_dilated" in ins.op_name and not cls.startswith("layout"):
        lowering[cls] += 1
  # Convolutions XLA left as HLO convolution ops inside fusions (not cuDNN): counted by their fusion above.
  conv_outputs = set(conv_names)
  for ins in by_name.values():  # the tuple elements of a cuDNN call (result, workspace)
    if ins.opcode == "get-tuple-element" and ins.operands and ins.operands[0] in conv_names:
      conv_outputs.add(ins.name)
  consumers = collections.defaultdict(set)
  for ins in by_name.values():
    for op in ins.operands:
      consumers[op].add(ins.name)
  next_to_conv = 0
  for ins in layout:
    if set(ins.operands) & conv_outputs or consumers[ins.name] & conv_names:
      next_to_conv += 1
  biggest = sorted(((i.name, _first_array(i.shape), shape_bytes(i.shape)) for i in layout),
                   key=lambda t: -t[2])[:5]
  copies = [ins for comp in _executed(module) for ins in module.computations[comp]
            if ins.opcode == "copy" and _same_layout(ins, by_name)]
  return GpuKernels(dict(cudnn), dict(lowering), dict(kernels), len(layout),
                    sum(shape_bytes(i.shape) for i in layout), next_to_conv, biggest, len(copies),
                    sum(shape_bytes(i.shape) for i in copies))


_LAYOUT = re.compile(r"\{([0-9,]*)")


def _same_layout(ins: Instruction, by_name: Dict[str, Instruction]) -> bool:
  """A copy whose result has its operand's shape and layout: it moves no element, it duplicates a buffer."""
  source = by_name.get(ins.operands[0]) if ins.operands else None
  if source is None:
    return False
  return (_first_array(ins.shape) == _first_array(source.shape)
          and _LAYOUT.findall(ins.shape)[:1] == _LAYOUT.findall(source.shape)[:1] != [])


def _first_array(shape: str) -> str:
  match = _ARRAY.search(shape)
  return f"{match.group(1)}[{match.group(2)}]" if match else shape


@dataclasses.dataclass
class Collectives:
  """Collectives of a program by kind: {kind: (count, bytes per device of their results)}."""
  by_kind: Dict[str, Tuple[int, int]]

  @property
  def count(self) -> int:
    return sum(n for n, _ in self.by_kind.values())

  @property
  def bytes(self) -> int:
    return sum(b for _, b in self.by_kind.values())


def collectives(text: str) -> Collectives:
  """The collectives of an optimised HLO module (async pairs counted once, at their start), wherever they are
  (TPU fuses some into fusions)."""
  counts: Dict[str, List[int]] = {}
  for body in parse(text).computations.values():
    for ins in body:
      if ins.opcode.endswith("-done"):
        continue
      kind = next((c for c in COLLECTIVES if ins.opcode == c or ins.opcode == c + "-start"), None)
      if kind is None:
        continue
      entry = counts.setdefault(kind, [0, 0])
      entry[0] += 1
      entry[1] += shape_bytes(ins.shape if not ins.opcode.endswith("-start") else _async_result(ins.shape))
  return Collectives({k: (v[0], v[1]) for k, v in counts.items()})


def _async_result(shape: str) -> str:
  """The result part of an async start's shape ((operands), result[, context]) -> result; else the shape."""
  if not shape.startswith("("):
    return shape
  depth, parts, start = 0, [], 1
  for i, ch in enumerate(shape):
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
      if depth == 0:
        parts.append(shape[start:i])
        break
    elif ch == "," and depth == 1:
      parts.append(shape[start:i])
      start = i + 1
  return parts[1] if len(parts) >= 2 else shape
