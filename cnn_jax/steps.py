"""Train state, optimiser, the pure step functions, and the one place they are jitted over the mesh.

`train_step(state, batch) -> (state, metrics)` and `eval_step(state, batch) -> sums` are plain functions of
arrays. `jit_train_step` / `jit_eval_step` put an input's pure batch function in front of them and jit the
pair over the mesh (cnn_jax/data/input_api.py); `jit_init` compiles the parameter init. The dropout key of
step t is `fold_in(state.rng, t)`, so a resumed run draws exactly the masks an uninterrupted one would.
"""

import functools
from typing import Any, Callable, Dict, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from cnn_jax import sharding as shd
from cnn_jax.data import input_api
from cnn_jax.specs import LoopSpec, OptimizerSpec


class TrainState(train_state.TrainState):
  """Params, optimiser state, step (from flax), plus BatchNorm statistics, the base RNG key and, when the
  recipe averages weights, their exponential moving average `ema` ({'params', 'batch_stats'}; evaluated
  instead of the raw weights)."""
  batch_stats: Any = None
  rng: jax.Array = None
  ema: Any = None


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
  """The averaging decay after `step` steps: min(decay, (1 + step) / (10 + step)), so the average forgets the
  random initialisation within the first steps (TensorFlow's ExponentialMovingAverage with num_updates)."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def update_ema(ema, variables, decay: jax.Array):
  """ema <- decay * ema + (1 - decay) * variables, leaf by leaf (optax.incremental_update)."""
  return optax.incremental_update(variables, ema, step_size=1.0 - decay)


def learning_rate_schedule(opt: OptimizerSpec, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """LR per step: linear scaling with the global batch (the base LR is for batch 128), then the schedule.

  cosine:   linear warmup over `warmup_epochs`, cosine decay to 0 at `total_steps`.
  linear:   linear warmup (warmup_epochs > 0, specs.py), then linear decay to 0 at `total_steps`.
  onecycle: optax's cosine one-cycle: from peak/25 up to the peak over the warmup, then down to peak/25e4.
  step:     (warmup, then) the base LR times `step_factor` at each of `step_epochs` (the AlexNet/VGG recipe).
  constant: the base LR.
  """
  base_lr = opt.peak_learning_rate
  sched = opt.schedule
  warmup = int(round(sched.warmup_epochs * steps_per_epoch))
  warmup = min(warmup, max(total_steps - 1, 0))
  if sched.name == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=base_lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=0.0)
  if sched.name == "linear":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, base_lr, warmup),
         optax.linear_schedule(base_lr, 0.0, max(total_steps - warmup, 1))], [warmup])
  if sched.name == "onecycle":
    return optax.cosine_onecycle_schedule(max(total_steps, 2), base_lr, pct_start=max(warmup, 1) / max(total_steps, 2))
  if sched.name == "step":
    boundaries = {int(e * steps_per_epoch): sched.step_factor for e in sched.step_epochs}
    main = optax.piecewise_constant_schedule(base_lr, boundaries)
    if warmup == 0:
      return main
    return optax.join_schedules(
        [optax.linear_schedule(0.0, base_lr, warmup), lambda s: main(s + warmup)], [warmup])
  if sched.name == "constant":
    return optax.constant_schedule(base_lr)
  raise ValueError(f"unknown schedule {sched.name!r}")


def _decay_mask(params):
  """True for conv/dense kernels: weight decay skips biases and BatchNorm scales."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({k: k[-1] == "kernel" for k in flat})


def make_optimizer(opt: OptimizerSpec, schedule: optax.Schedule) -> optax.GradientTransformation:
  """SGD with momentum and L2 weight decay added to the gradient before momentum (as in AlexNet)."""
  parts = []
  if opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  if opt.weight_decay > 0:
    parts.append(optax.add_decayed_weights(
        opt.weight_decay, mask=None if opt.decay_biases else _decay_mask))
  parts.append(optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov))
  return optax.chain(*parts)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       image_shape: Tuple[int, ...], ema: bool = False) -> TrainState:
  """Initialises parameters (and BatchNorm statistics) for inputs of shape [1, *image_shape]; with `ema`,
  their moving average starts at the initial weights."""
  init_rng, params_rng, dropout_rng, state_rng = jax.random.split(rng, 4)
  del init_rng
  variables = model.init({"params": params_rng, "dropout": dropout_rng},
                         jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
  state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                            batch_stats=variables.get("batch_stats"), rng=state_rng,
                            ema=_averaged(variables) if ema else None)
  # flax starts `step` at the Python int 0, a weakly typed int32 under jit; a restored checkpoint's step is a
  # plain int32. Typed alike, a fresh run and a resumed one trace the very same train step, so a restart
  # loads the executable the first launch put in a persistent compilation cache instead of recompiling.
  return state.replace(step=jnp.zeros((), jnp.int32))


def _averaged(variables) -> Dict[str, Any]:
  """What the weight average covers: the parameters and the BatchNorm statistics."""
  out = {"params": variables["params"]}
  if variables.get("batch_stats") is not None:
    out["batch_stats"] = variables["batch_stats"]
  return out


def init_compiler_options() -> Dict[str, Any]:
  """XLA options for the jitted `create_train_state`: on the CPU, LLVM at -O2 rather than XLA's default -O3.

  The init runs once, and at -O3 its random initialisers (threefry hashing, the normal / truncated-normal
  transforms) take several times longer to compile. At -O2 the parameters are bit-identical
  (`tests/test_train.py::test_init_at_o2_is_bit_identical`; -O0 is not: it rounds the normal transforms
  differently). Train and eval steps keep the default: their results would change in the last bit. Elsewhere {}.
  """
  return {"xla_backend_optimization_level": 2} if jax.default_backend() == "cpu" else {}


def jit_init(model: nn.Module, tx: optax.GradientTransformation, image_shape: Tuple[int, ...],
             ema: bool = False, **jit_kwargs) -> Callable[[jax.Array], TrainState]:
  """`rng -> TrainState`: `create_train_state` jitted with `init_compiler_options()` (and `jit_kwargs`, e.g.
  out_shardings)."""
  return jax.jit(functools.partial(create_train_state, model, tx, image_shape=tuple(image_shape), ema=ema),
                 compiler_options=init_compiler_options(), **jit_kwargs)


def _topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """[B] float32: 1 where the label is among the k largest logits (ties go to the lower class index,
  as lax.top_k breaks them; a constant output therefore scores top-k only for the first k classes).

  Elementwise per example, so a batch sharded over devices needs no gather (lax.top_k would all-gather
  the logits of the whole batch).
  """
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  index = jnp.arange(logits.shape[-1])[None, :]
  ahead = (logits > label_logit) | ((logits == label_logit) & (index < labels[:, None]))
  return (jnp.sum(ahead, axis=-1) < k).astype(jnp.float32)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """[B] per-example softmax cross-entropy in float32."""
  num_classes = logits.shape[-1]
  onehot = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    onehot = optax.smooth_labels(onehot, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot)


def layer_grad_norms(grads) -> Dict[str, jax.Array]:
  """{'grad_norm/<layer>': L2 norm} per layer of a gradient tree, in network order.

  A layer is a module that holds arrays directly (a conv or dense layer: 'kernel', 'bias'; a BatchNorm: 'scale',
  'bias'). Names are the '/'-joined module path, e.g. 'conv1', 'block2/mlp1', 'head/fc1', 'block1_bn1'. Flax
  keeps submodules in definition order, which is network order (jitted metrics come back key-sorted; train.py
  records the order in run_info.json as 'layer_order').
  """
  return {"grad_norm/" + name: optax.global_norm(leaves) for name, leaves in layers(grads).items()}


def layers(tree) -> Dict[str, Dict[str, Any]]:
  """{'/'-joined module path: {leaf name: leaf}} for every module of a params-like tree that holds leaves
  directly, in the tree's order (Flax: definition order)."""
  out = {}

  def visit(node, path):
    leaves = {k: v for k, v in node.items() if not hasattr(v, "items")}
    if leaves:
      out["/".join(path)] = leaves
    for k, v in node.items():
      if hasattr(v, "items"):
        visit(v, path + (k,))

  visit(tree, ())
  return out


def train_step(state: TrainState, batch: Dict[str, jax.Array], *, label_smoothing: float = 0.0,
               schedule: Callable = None, log_layer_grad_norms: bool = False,
               ema_decay: float = 0.0) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One SGD step on a global batch {'image': [B,H,W,C], 'label': [B]}; returns (state, metrics).

  With `log_layer_grad_norms`, metrics also hold 'grad_norm/<layer>' for every layer (see
  layer_grad_norms): the vanishing-gradient diagnostic of the activation ablation. With a state that
  averages its weights, the average moves towards the new weights with `ema_decay` (see ema_decay_at).
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  has_bn = state.batch_stats is not None

  def loss_fn(params):
    variables = {"params": params}
    if has_bn:
      variables["batch_stats"] = state.batch_stats
    logits, new_vars = state.apply_fn(
        variables, batch["image"], train=True, rngs={"dropout": dropout_rng},
        mutable=["batch_stats"] if has_bn else [])
    loss = jnp.mean(cross_entropy(logits, batch["label"], label_smoothing))
    return loss, (logits, new_vars)

  (loss, (logits, new_vars)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.global_norm(grads)
  new_state = state.apply_gradients(grads=grads)
  if has_bn:
    new_state = new_state.replace(batch_stats=new_vars["batch_stats"])
  if state.ema is not None:
    new_state = new_state.replace(ema=update_ema(
        state.ema, _averaged({"params": new_state.params, "batch_stats": new_state.batch_stats}),
        ema_decay_at(state.step, ema_decay)))
  metrics = {
      "loss": loss,
      "top1": jnp.mean(_topk_correct(logits, batch["label"], 1)),
      "top5": jnp.mean(_topk_correct(logits, batch["label"], 5)),
      "grad_norm": grad_norm,
  }
  if log_layer_grad_norms:
    metrics.update(layer_grad_norms(grads))
  if schedule is not None:
    metrics["lr"] = schedule(state.step)
  return new_state, metrics


def eval_step(state: TrainState, batch: Dict[str, jax.Array], flip: bool = False) -> Dict[str, jax.Array]:
  """Sums over the real (mask=True) examples of one eval batch, on the averaged weights when the state has them.

  batch: {'image': [B,H,W,C] or [B,n_crops,H,W,C] (logits are averaged over crops), 'label': [B],
  'mask': [B] bool}. `flip`: average the logits of each image and its mirror image (test-time augmentation;
  ten crops hold their mirror images already). Returns {'loss', 'top1', 'top5', 'count'} as float32 sums.
  """
  variables = state.ema if state.ema is not None else _averaged(
      {"params": state.params, "batch_stats": state.batch_stats})
  images = batch["image"]
  if images.ndim == 5:
    # One crop of every image after another, not all ten as one batch of 10 B: XLA reuses one crop batch's
    # activations' memory for the next, so a ten-crop eval needs about a train step's memory.
    logits = sum(state.apply_fn(variables, images[:, i], train=False) for i in range(images.shape[1]))
    logits = logits / images.shape[1]
  elif flip:  # two passes rather than one over a doubled batch: no resharding of a batch split on `data`
    logits = (state.apply_fn(variables, images, train=False)
              + state.apply_fn(variables, images[:, :, ::-1], train=False)) / 2
  else:
    logits = state.apply_fn(variables, images, train=False)
  mask = batch["mask"].astype(jnp.float32)
  labels = batch["label"]
  return {
      "loss": jnp.sum(cross_entropy(logits, labels) * mask),
      "top1": jnp.sum(_topk_correct(logits, labels, 1) * mask),
      "top5": jnp.sum(_topk_correct(logits, labels, 5) * mask),
      "count": jnp.sum(mask),
  }


def recipe_steps(opt: OptimizerSpec, loop: LoopSpec, schedule: optax.Schedule) -> Tuple[Callable, Callable]:
  """(train_step, eval_step) with the recipe's loss, schedule, weight average and test-time flip bound: the two
  pure functions a run jits (cnn_jax.train, and cnn_jax.compile_check for an accelerator)."""
  train = functools.partial(train_step, label_smoothing=opt.label_smoothing, schedule=schedule,
                            log_layer_grad_norms=loop.log_grad_norms, ema_decay=opt.ema_decay)
  return train, functools.partial(eval_step, flip=loop.eval_flip)


# --- Compiled over the mesh: the one place the train and eval programs are jitted ------------------

def jit_train_step(step_fn: Callable, inp, mesh, compiler_options=None) -> Callable:
  """`train(state, args) -> (state, metrics)`: `step_fn(state, inp.make_batch(args, state.step))` under one
  jit, the state replicated (and donated), `args` (inp.train_args(step)) with the input's shardings."""
  replicated = shd.replicated(mesh)

  def train(state, args):
    return step_fn(state, inp.make_batch(args, state.step))

  return jax.jit(train, in_shardings=(replicated, input_api.shardings(inp.train_spec())),
                 out_shardings=(replicated, replicated), donate_argnums=(0,), compiler_options=compiler_options)


def jit_eval_step(eval_fn: Callable, inp, mesh, split=None, compiler_options=None) -> Callable:
  """`evaluate(state, args) -> sums`: `eval_fn(state, inp.make_eval_batch(args))` under one jit."""
  replicated = shd.replicated(mesh)

  def evaluate(state, args):
    return eval_fn(state, inp.make_eval_batch(args))

  return jax.jit(evaluate, in_shardings=(replicated, input_api.shardings(inp.eval_spec(split))),
                 out_shardings=replicated, compiler_options=compiler_options)
