r"""Where one jitted train step's time goes: a per-op breakdown read from a `jax.profiler` trace.

For each model, the real training step (`cnn_jax.steps.train_step`, the shared recipe's optimiser) is compiled
as train.py compiles it, run for --warmup steps, then traced for --steps steps with `jax.profiler.trace`. The
trace's Perfetto JSON (`perfetto_trace.json.gz`, written beside the `.xplane.pb`) names, for every executed
op, the HLO instruction it ran (`hlo_op`; on a GPU one instruction may launch several kernels). Each
instruction is looked up in the compiled module's HLO text, which says what it is (a cuDNN convolution, a
fusion holding a dot, a reduce-window, a transpose or copy, ...) and, through its `op_name` metadata, which
layer and which pass it belongs to: `jvp(Model)/conv2/...` is the forward pass of layer conv2,
`transpose(jvp(Model))/conv2/...` its backward pass, everything else (optimizer update, loss, metrics, the
device input's gather and augmentation) is 'other'. Printed per model:

  * the step's wall time, the device's busy time (union of op intervals) and the rest ('idle': launch gaps,
    host work and synchronisation between the ops);
  * time per category (conv, matmul = the FC head, pool, layout = transposes/copies, reduce, elementwise,
    random, gather/scatter, memcpy) and per pass, and per layer;
  * the top --top instructions, with their category, pass and layer.

  python benchmarks/profile_step.py --models=nin --geometry=small --width=0.25 --batch=32   # CPU dry run
  python benchmarks/profile_step.py --models=alexnet,vgg11,nin --batch=256 --dtype=bfloat16 \
      --input=device --array_cache_dir=.arrays                                              # on a GPU

--input=synthetic times the step on one constant batch already on the device (what benchmarks/end_to_end.py
calls 'synthetic'); --input=device compiles it behind the device-resident input (gather + augmentation inside
the step, as `--config.input=device` trains), which needs the array cache. On the CPU the 'device' is XLA's
thread pool: ops of one step can overlap on several threads, so busy time is their union, not their sum.
"""

import collections
import dataclasses
import functools
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
if __name__ == '__main__':
  flags.DEFINE_list('models', ['alexnet', 'vgg11', 'nin'], 'Registry names to profile.')
  flags.DEFINE_enum('geometry', 'native', ['native', 'small'], 'small: 32 px; native: the paper\'s resolution.')
  flags.DEFINE_float('width', 1.0, 'Channel width multiplier.')
  flags.DEFINE_integer('batch', 256, 'Global batch size.')
  flags.DEFINE_enum('dtype', 'bfloat16', ['float32', 'bfloat16'], 'Compute dtype (params stay float32).')
  flags.DEFINE_enum('input', 'synthetic', ['synthetic', 'device'],
                    'synthetic: one constant on-device batch; device: the device-resident input in the step.')
  flags.DEFINE_string('dataset', 'fashion_mnist', 'Dataset (--input=device).')
  flags.DEFINE_string('data_dir', None, 'Prepared tfds data dir (--input=device, if the array cache is missing).')
  flags.DEFINE_string('array_cache_dir', None, 'Array cache folder (--input=device).')
  flags.DEFINE_integer('num_classes', 10, 'Classes of the synthetic input (device input: the dataset\'s).')
  flags.DEFINE_integer('steps', 5, 'Steps traced.')
  flags.DEFINE_integer('warmup', 3, 'Steps run after compilation, before the trace.')
  flags.DEFINE_integer('top', 15, 'Instructions listed per model.')
  flags.DEFINE_string('trace_dir', None, 'Keep the traces here (one folder per model); default: a temp dir.')
  flags.DEFINE_string('json_out', None, 'Also write the breakdowns as JSON here.')

CATEGORIES = ('conv', 'matmul', 'pool', 'layout', 'reduce', 'elementwise', 'random', 'gather/scatter',
              'memcpy', 'other')
_LAYOUT_OPS = {'transpose', 'copy', 'reshape', 'copy-start', 'copy-done', 'slice', 'concatenate', 'pad',
               'dynamic-slice', 'dynamic-update-slice', 'broadcast', 'bitcast-convert', 'convert', 'reverse'}


# --- The compiled module: what each instruction is -------------------------------------------------

@dataclasses.dataclass
class HloOp:
  """One instruction of the compiled module (HLO text), classified."""
  name: str
  opcode: str
  category: str   # one of CATEGORIES
  phase: str      # 'fwd' | 'bwd' | 'other'
  layer: str      # the Flax module path, e.g. 'conv2' or 'head/fc1'; '' outside the network
  op_name: str    # the jax op_name metadata


_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def parse_hlo(text: str) -> Dict[str, HloOp]:
  """{instruction name: HloOp} for every instruction of an HLO module's text (`Compiled.as_text()`)."""
  computations: Dict[str, List[Tuple[str, str, str]]] = {}   # computation -> [(name, opcode, rest)]
  current = None
  for line in text.splitlines():
    if current is None or not line.startswith(' '):
      match = _COMPUTATION.match(line)
      if match and '=' not in line.split('(')[0]:
        current = match.group(1)
        computations[current] = []
        continue
      if line.startswith('}'):
        current = None
        continue
    match = _INSTRUCTION.match(line)
    if match and current is not None:
      computations[current].append((match.group(1), match.group(3), match.group(4)))

  def opcodes_of(computation: str, depth: int = 0) -> set:
    found = set()
    for _, opcode, rest in computations.get(computation, ()):
      found.add(opcode)
      target = _TARGET.search(rest)
      if target:
        found.add('custom-call:' + target.group(1))
      called = _CALLS.search(rest)
      if called and depth < 3:
        found |= opcodes_of(called.group(1), depth + 1)
    return found

  ops = {}
  for instructions in computations.values():
    for name, opcode, rest in instructions:
      contents = {opcode}
      target = _TARGET.search(rest)
      if target:
        contents.add('custom-call:' + target.group(1))
      called = _CALLS.search(rest)
      if called:
        contents |= opcodes_of(called.group(1))
      op_name = _OP_NAME.search(rest)
      op_name = op_name.group(1) if op_name else ''
      phase, layer = phase_and_layer(op_name)
      ops[name] = HloOp(name, opcode, categorize(contents, op_name), phase, layer, op_name)
  return ops


def categorize(contents: set, op_name: str = '') -> str:
  """The category of an instruction from the opcodes it holds (itself, or a fusion's body) and its op_name.

  'layout' is data movement alone (transposes, copies, pads, slices, concatenations, converts);
  a dot that computes a convolution (the CPU's 1x1 convs and tuned kernels) counts as 'conv'.
  """
  core = contents - {'fusion', 'parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast'}
  targets = ' '.join(c for c in core if c.startswith('custom-call:')).lower()
  if 'convolution' in core or 'conv' in targets:
    return 'conv'
  if 'dot' in core or any(t in targets for t in ('gemm', 'matmul', 'cublas')):
    return 'conv' if op_name.endswith('conv_general_dilated') else 'matmul'
  if core & {'reduce-window', 'select-and-scatter'}:
    return 'pool'
  if core & {'rng', 'rng-bit-generator', 'rng-get-and-update-state'}:
    return 'random'
  if core & {'gather', 'scatter'}:
    return 'gather/scatter'
  if core & {'reduce', 'all-reduce'}:
    return 'reduce'
  if core <= _LAYOUT_OPS:
    return 'layout'
  if core & {'while', 'conditional', 'call'}:
    return 'other'
  return 'elementwise'


def phase_and_layer(op_name: str) -> Tuple[str, str]:
  """('fwd' | 'bwd' | 'other', layer path) from a jax op_name such as
  'jit(train_step)/transpose(jvp(AlexNet))/head/fc1/dot_general' -> ('bwd', 'head/fc1')."""
  parts = op_name.split('/')
  for i, part in enumerate(parts):
    model = re.fullmatch(r'(transpose\()?jvp\(([A-Za-z]\w*)\)\)?', part)
    if model:
      phase = 'bwd' if model.group(1) else 'fwd'
      # Module names follow until the primitive (the last part) or a jitted helper such as jit(relu).
      layer = []
      for module in parts[i + 1:-1]:
        if '(' in module:
          break
        layer.append(module)
      return phase, '/'.join(layer)
  return 'other', ''


# --- The trace ---------------------------------------------------------------------------------------

def trace_steps(run: Callable[[int], Any], steps: int, log_dir: str) -> Tuple[str, float]:
  """Runs `run(steps)` (which must block until its steps are done) under `jax.profiler.trace`; returns the
  path of the Perfetto JSON trace written under `log_dir` and the wall seconds of the traced steps."""
  import jax  # pylint: disable=g-import-not-at-top
  os.makedirs(log_dir, exist_ok=True)
  with jax.profiler.trace(log_dir, create_perfetto_trace=True):
    start = time.perf_counter()
    run(steps)
    wall = time.perf_counter() - start
  found = sorted(glob.glob(os.path.join(log_dir, '**', 'perfetto_trace.json.gz'), recursive=True),
                 key=os.path.getmtime)
  if not found:
    raise RuntimeError(f'jax.profiler wrote no perfetto_trace.json.gz under {log_dir}')
  return found[-1], wall


@dataclasses.dataclass
class OpEvent:
  """One executed op (a kernel on a GPU stream, a thunk on a CPU thread), times in microseconds."""
  hlo_op: str
  kernel: str
  ts: float
  dur: float


_DERIVED_LINES = ('xla modules', 'xla ops', 'steps', 'tensorflow ops', 'tensorflow name scope', 'source code',
                  'xla traceme', 'framework ops', 'framework name scope', 'launch stats', 'sparsecore')


def op_events(trace_path: str, module: str) -> Tuple[List[OpEvent], str]:
  """The executed ops of HLO module `module` in a Perfetto JSON trace, and which lines they came from.

  GPU: the kernels and memcpys on the device's stream lines ('/device:GPU:N', threads named 'Stream ...'),
  each with its `hlo_op` where the profiler recorded it (the derived 'XLA Ops' line is used only when there
  are no stream lines, so no op counts twice). CPU: the thunks executed on the host's XLA threads, which carry
  `hlo_op` and `hlo_module`.
  """
  with gzip.open(trace_path, 'rt') as f:
    events = json.load(f)['traceEvents']
  process_names, thread_names = {}, {}
  for e in events:
    if e.get('ph') == 'M' and e.get('name') == 'process_name':
      process_names[e.get('pid')] = str(e.get('args', {}).get('name', ''))
    elif e.get('ph') == 'M' and e.get('name') == 'thread_name':
      thread_names[(e.get('pid'), e.get('tid'))] = str(e.get('args', {}).get('name', ''))
  device_pids = {pid for pid, name in process_names.items() if '/device:' in name and 'CPU' not in name}
  complete = [e for e in events if e.get('ph') == 'X' and 'dur' in e]

  def of_module(e):
    mod = (e.get('args') or {}).get('hlo_module')
    return mod is None or mod == module or str(mod).startswith(module + '(')

  def to_event(e):
    args = e.get('args') or {}
    hlo_op = str(args.get('hlo_op') or args.get('hlo_ops') or '').split(',')[0].strip()
    return OpEvent(hlo_op, e.get('name', ''), float(e['ts']), float(e['dur']))

  if device_pids:
    lines = {k: v.lower() for k, v in thread_names.items() if k[0] in device_pids}
    streams = {k for k, v in lines.items() if 'stream' in v and not any(d in v for d in _DERIVED_LINES)}
    if streams:
      chosen = [e for e in complete if (e.get('pid'), e.get('tid')) in streams and of_module(e)]
      return [to_event(e) for e in chosen], f'{len(streams)} GPU stream line(s)'
    xla_ops = {k for k, v in lines.items() if v == 'xla ops'}
    chosen = [e for e in complete if (e.get('pid'), e.get('tid')) in xla_ops and of_module(e)]
    if chosen:
      return [to_event(e) for e in chosen], "the device's 'XLA Ops' line"
    chosen = [e for e in complete if e.get('pid') in device_pids and (e.get('args') or {}).get('hlo_op')]
    return [to_event(e) for e in chosen], 'device events with hlo_op (no stream lines found)'
  chosen = [e for e in complete if (e.get('args') or {}).get('hlo_op')
            and (e.get('args') or {}).get('hlo_module') == module]
  if not chosen:  # say what the trace holds, so a new profiler format can be read next time
    lines = sorted({f'{process_names.get(p, p)}/{t}' for (p, _), t in thread_names.items()})[:20]
    return [], f'NO ops of {module} found; the trace\'s lines: {lines}'
  return [to_event(e) for e in chosen], 'host CPU thunks'


def _union_length(intervals: Sequence[Tuple[float, float]]) -> float:
  total, end = 0.0, None
  for start, stop in sorted(intervals):
    if end is None or start > end:
      total += stop - start
      end = stop
    elif stop > end:
      total += stop - end
      end = stop
  return total


def _memcpy_kind(kernel: str) -> bool:
  k = kernel.lower()
  return 'memcpy' in k or 'memset' in k


def breakdown(events: Sequence[OpEvent], ops: Dict[str, HloOp], steps: int, wall_s: float) -> Dict[str, Any]:
  """Per-step times (ms) by instruction, category, pass and layer, plus busy and idle time.

  Args:
    events: the traced ops (`op_events`).
    ops: the module's instructions (`parse_hlo`).
    steps: how many steps the trace covers.
    wall_s: wall seconds of those steps.
  """
  per_op = collections.defaultdict(lambda: {'us': 0.0, 'count': 0, 'kernels': collections.Counter()})
  for e in events:
    key = e.hlo_op or (('memcpy: ' if _memcpy_kind(e.kernel) else 'kernel: ') + e.kernel[:60])
    per_op[key]['us'] += e.dur
    per_op[key]['count'] += 1
    per_op[key]['kernels'][e.kernel[:80]] += 1
  ms = lambda us: us / 1e3 / steps
  busy = _union_length([(e.ts, e.ts + e.dur) for e in events])
  wall_ms = wall_s * 1e3 / steps
  rows = []
  for key, agg in per_op.items():
    op = ops.get(key)
    if op is not None:
      category, phase, layer = op.category, op.phase, op.layer
    elif key.startswith('memcpy: '):
      category, phase, layer = 'memcpy', 'other', ''
    else:
      category, phase, layer = 'other', 'other', ''
    rows.append({'op': key, 'category': category, 'phase': phase, 'layer': layer, 'ms': ms(agg['us']),
                 'calls': agg['count'] / steps, 'kernel': agg['kernels'].most_common(1)[0][0],
                 'op_name': op.op_name if op else ''})
  rows.sort(key=lambda r: -r['ms'])
  by = lambda field: dict(sorted(
      ((k, sum(r['ms'] for r in rows if r[field] == k)) for k in {r[field] for r in rows}),
      key=lambda kv: -kv[1]))
  matched = sum(r['ms'] for r in rows if r['op'] in ops)
  return {'steps': steps, 'wall_ms': wall_ms, 'busy_ms': ms(busy), 'idle_ms': max(0.0, wall_ms - ms(busy)),
          'op_ms': sum(r['ms'] for r in rows), 'matched_ms': matched, 'num_events': len(events),
          'by_category': by('category'), 'by_phase': by('phase'), 'by_layer': by('layer'), 'ops': rows}


def format_breakdown(result: Dict[str, Any], top: int = 15) -> str:
  """The breakdown as a few aligned text blocks."""
  wall = result['wall_ms'] or 1e-9
  pct = lambda v: f'{100 * v / wall:5.1f}%'
  lines = [f"  step {result['wall_ms']:.2f} ms wall: device busy {result['busy_ms']:.2f} ms ({pct(result['busy_ms'])}), "
           f"idle {result['idle_ms']:.2f} ms ({pct(result['idle_ms'])}) = launch gaps, host work, sync; "
           f"ops sum {result['op_ms']:.2f} ms over {result['num_events']} events "
           f"({result['matched_ms']:.2f} ms matched to HLO instructions)"]
  lines.append('  by category: ' + ', '.join(f'{k} {v:.2f} ms ({pct(v).strip()})'
                                             for k, v in result['by_category'].items()))
  lines.append('  by pass:     ' + ', '.join(f'{k} {v:.2f} ms ({pct(v).strip()})'
                                             for k, v in result['by_phase'].items()))
  lines.append('  by layer:    ' + ', '.join(f'{k or "(outside the net)"} {v:.2f}'
                                             for k, v in list(result['by_layer'].items())[:12]) + ' ms')
  lines.append(f"  {'top ops':44s} {'ms/step':>8s} {'%wall':>6s} {'calls':>5s}  category        pass   layer")
  for r in result['ops'][:top]:
    lines.append(f"  {r['op'][:44]:44s} {r['ms']:8.3f} {pct(r['ms'])} {r['calls']:5.1f}  {r['category']:15s} "
                 f"{r['phase']:5s}  {r['layer']}")
  return '\n'.join(lines)


def profile(compiled, run: Callable[[int], Any], steps: int, log_dir: str) -> Dict[str, Any]:
  """Traces `run(steps)` of the executable `compiled` (a jax `Compiled`) and returns its breakdown.

  `run(n)` must run n steps of `compiled` and block until they are done.
  """
  text = compiled.as_text()
  module = re.match(r'HloModule\s+([\w.\-]+)', text)
  module = module.group(1) if module else ''
  path, wall = trace_steps(run, steps, log_dir)
  events, source = op_events(path, module)
  result = breakdown(events, parse_hlo(text), steps, wall)
  result.update(module=module, source=source, trace=path)
  return result


# --- The command line: the real train step of each model ---------------------------------------------

def _config(model: str):
  from configs import common  # pylint: disable=g-import-not-at-top
  from cnn_jax import models  # pylint: disable=g-import-not-at-top
  config = common.get_config('small' if FLAGS.geometry == 'small' else '', model=model,
                             native_res=models.native_resolution(model))
  config.model_kwargs.width = FLAGS.width if model != 'lenet' else 1.0
  config.batch_size = FLAGS.batch
  config.dtype = FLAGS.dtype
  config.dataset = FLAGS.dataset
  config.data_dir = FLAGS.data_dir
  config.array_cache_dir = FLAGS.array_cache_dir
  config.input = 'device'
  config.num_train_steps = 1000
  return config


def _compiled_step(config):
  """(compiled executable, run(n) -> None, flops per step) of the real train step for `config`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cnn_jax import ops, perf, sharding as shd, steps as steps_lib, train  # pylint: disable=g-import-not-at-top
  from cnn_jax.specs import OptimizerSpec  # pylint: disable=g-import-not-at-top
  mesh = shd.make_mesh()
  size = config.image_size
  repl = shd.replicated(mesh)
  if FLAGS.input == 'device':
    from cnn_jax.data import inputs as inputs_lib  # pylint: disable=g-import-not-at-top
    inp = inputs_lib.create(config, mesh, announce=lambda line: print(line, flush=True))
    num_classes, steps_per_epoch = inp.info.num_classes, inp.steps_per_epoch
  else:
    inp, num_classes, steps_per_epoch = None, FLAGS.num_classes, 100
  model = train.build_model(config, num_classes)
  opt = OptimizerSpec.from_config(config)
  schedule = steps_lib.learning_rate_schedule(opt, steps_per_epoch, config.num_train_steps)
  tx = steps_lib.make_optimizer(opt, schedule)
  state = steps_lib.jit_init(model, tx, (size, size, 3), out_shardings=repl)(jax.random.PRNGKey(0))
  step_fn = functools.partial(steps_lib.train_step, label_smoothing=config.optimizer.label_smoothing,
                              schedule=schedule)
  holder = {'state': state, 'step': 0}
  if inp is not None:
    compiled = steps_lib.jit_train_step(step_fn, inp, mesh, ops.compiler_options()).lower(
        state, inp.train_spec()).compile()
    batch_spec = jax.eval_shape(inp.make_batch, inp.train_spec(), state.step)

    def call():
      holder['state'], metrics = compiled(holder['state'], inp.train_args(holder['step']))
      holder['step'] += 1
      return metrics
  else:
    rng = np.random.default_rng(0)
    batch = shd.make_global_batch({
        'image': rng.standard_normal((config.batch_size, size, size, 3)).astype(jnp.dtype(config.dtype)),
        'label': rng.integers(0, num_classes, config.batch_size).astype(np.int32)}, mesh)
    jitted = jax.jit(step_fn, in_shardings=(repl, shd.batch_sharded(mesh)), out_shardings=(repl, repl),
                     donate_argnums=(0,), compiler_options=ops.compiler_options())
    compiled = jitted.lower(state, batch).compile()
    batch_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch)

    def call():
      holder['state'], metrics = compiled(holder['state'], batch)
      return metrics

  def run(n):
    metrics = None
    for _ in range(n):
      metrics = call()
    jax.block_until_ready((holder['state'], metrics))

  flops = perf.step_flops(compiled, jax.device_count(), jax.jit(step_fn), state, batch_spec)
  return compiled, run, flops


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from cnn_jax import cli, perf  # pylint: disable=g-import-not-at-top
  cli.setup_runtime(distributed='off')
  device = jax.devices()[0]
  print(f'profile of one train step: {FLAGS.geometry} geometry, width {FLAGS.width}, batch {FLAGS.batch}, '
        f'{FLAGS.dtype}, {FLAGS.input} input, {FLAGS.steps} traced steps, {jax.device_count()} x '
        f'{device.device_kind} ({jax.default_backend()})', flush=True)
  trace_root = FLAGS.trace_dir or tempfile.mkdtemp(prefix='cnn_jax_profile_')
  results = {}
  failed = False
  for name in FLAGS.models:
    config = _config(name)
    start = time.perf_counter()
    try:  # one model's failure leaves the others' profiles
      compiled, run, flops = _compiled_step(config)
      compile_s = time.perf_counter() - start
      run(FLAGS.warmup)
      result = profile(compiled, run, FLAGS.steps, os.path.join(trace_root, name))
    except Exception as e:  # pylint: disable=broad-except
      print(f'{name}: profile failed: {type(e).__name__}: {e}', flush=True)
      failed = True
      continue
    util = perf.mfu(flops, result['wall_ms'] / 1e3, jax.devices(), config.dtype)
    result.update(model=name, image_size=config.image_size, flops_per_step=flops, mfu=util,
                  compile_s=compile_s, img_per_s=config.batch_size / (result['wall_ms'] / 1e3))
    mfu_text = f'{util * 100:.1f}%' if util is not None else 'n/a'
    print(f"{name} {config.image_size}px: {result['img_per_s']:.0f} img/s while traced, MFU {mfu_text} "
          f"({flops / 1e9:.1f} GFLOP/step); compiled in {compile_s:.1f}s; module {result['module']}, ops from "
          f"{result['source']}", flush=True)
    print(format_breakdown(result, FLAGS.top), flush=True)
    results[name] = result
    if FLAGS.json_out:  # after each model, so a run stopped by a time limit keeps the finished ones
      slim = {k: {**v, 'ops': v['ops'][:50]} for k, v in results.items()}
      with open(FLAGS.json_out + '.tmp', 'w') as f:
        json.dump({'device': device.device_kind, 'backend': jax.default_backend(), 'input': FLAGS.input,
                   'batch': FLAGS.batch, 'dtype': FLAGS.dtype, 'models': slim}, f, indent=1)
      os.replace(FLAGS.json_out + '.tmp', FLAGS.json_out)
  return 1 if failed else 0


if __name__ == '__main__':
  app.run(main)
