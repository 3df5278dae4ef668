r"""The chapter's static claims, measured: parameter counts (claim 4), the 1x1-convolution bottleneck's
compute (claim 5) and what the 4096-wide FC layers hold (claim 6). Nothing trains; shapes come from
``jax.eval_shape`` and FLOPs from XLA's cost analysis of the compiled forward pass on the host CPU.

  python -m cnn_jax.compare.claims                  # all three, as Markdown tables
  python -m cnn_jax.compare.claims --claims=1x1 --size=32 --c_in=256 --c_mid=64

The training claims (1-3, and 4's "takes longer to train") are sweeps: configs/sweeps/.
"""

import sys
from typing import Any, Dict, List, Sequence

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax import models
from cnn_jax import perf
from cnn_jax.models import summary

BYTES = {"float32": 4, "bfloat16": 2}


def _param_shapes(name: str, num_classes: int, image_size: int, **kwargs) -> Dict[str, Any]:
  model = models.get_model(name, num_classes, **kwargs)
  variables = jax.eval_shape(
      lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                         jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False))
  return variables["params"]


# --- Claim 4: parameters --------------------------------------------------------------------------

def param_counts(names: Sequence[str] = ("alexnet", "vgg11", "nin", "lenet"),
                 num_classes: Sequence[int] = (10, 1000)) -> List[Dict[str, Any]]:
  """Exact parameter counts at the native geometry: [{'model', 'image_size', 'num_classes', 'params'}]."""
  rows = []
  for name in names:
    size = models.native_resolution(name)
    for n in num_classes:
      rows.append({"model": name, "image_size": size, "num_classes": n,
                   "params": summary.count_params(_param_shapes(name, n, size))})
  return rows


# --- Claim 5: a 1x1 convolution as a bottleneck ---------------------------------------------------

class _Block(nn.Module):
  """[optional 1x1 conv c_in -> c_mid, ReLU] then the following k x k conv -> c_out, SAME padding."""
  c_mid: int = 0
  c_out: int = 256
  k: int = 3

  @nn.compact
  def __call__(self, x):
    if self.c_mid:
      x = nn.relu(nn.Conv(self.c_mid, (1, 1), name="reduce")(x))
    return nn.relu(nn.Conv(self.c_out, (self.k, self.k), padding="SAME", name="next")(x))


def _forward_flops(module: nn.Module, shape) -> float:
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(shape, jnp.float32)))
  return perf.host_cpu_flops(jax.jit(module.apply), variables, x)


def one_by_one(size: int = 32, c_in: int = 256, c_mid: int = 64, c_out: int = 256,
               k: int = 3) -> Dict[str, Any]:
  """FLOPs (per image, XLA) of a k x k conv c_in -> c_out on a size x size map, with and without a 1x1
  c_in -> c_mid reduction in front; also the 1x1's output shape (spatial size kept?)."""
  shape = (1, size, size, c_in)
  reduce_only = nn.Conv(c_mid, (1, 1))
  out_shape = jax.eval_shape(
      lambda: reduce_only.apply(reduce_only.init(jax.random.key(0), jnp.zeros(shape)), jnp.zeros(shape))).shape
  direct = _forward_flops(_Block(c_mid=0, c_out=c_out, k=k), shape)
  reduce = _forward_flops(reduce_only, shape)
  following_reduced = _forward_flops(_Block(c_mid=0, c_out=c_out, k=k), (1, size, size, c_mid))
  with_1x1 = _forward_flops(_Block(c_mid=c_mid, c_out=c_out, k=k), shape)
  return {"size": size, "c_in": c_in, "c_mid": c_mid, "c_out": c_out, "k": k,
          "in_shape": shape, "reduce_out_shape": tuple(out_shape),
          "flops_1x1": reduce, "flops_next_direct": direct, "flops_next_after_1x1": following_reduced,
          "flops_total_with_1x1": with_1x1,
          "next_layer_saving": direct / following_reduced if following_reduced else float("nan"),
          "total_saving": direct / with_1x1 if with_1x1 else float("nan")}


# --- Claim 6: the FC layers ------------------------------------------------------------------------

def fc_memory(name: str = "alexnet", num_classes: int = 1000) -> Dict[str, Any]:
  """Per FC layer of the head (native geometry): shape, params, bytes in float32/bfloat16; totals for the
  hidden FC layers (fc1 + fc2, the two 4096-wide ones), the whole model, and the training state in float32
  (params + gradients + SGD momentum = 3 copies)."""
  params = _param_shapes(name, num_classes, models.native_resolution(name))
  head = params["head"]
  layers = []
  for layer, leaves in head.items():
    n = summary.count_params(leaves)
    layers.append({"layer": f"head/{layer}", "kernel": tuple(leaves["kernel"].shape), "params": n,
                   **{f"bytes_{d}": n * b for d, b in BYTES.items()}})
  hidden = sum(l["params"] for l in layers if l["layer"] != "head/logits")
  total = summary.count_params(params)
  return {"model": name, "num_classes": num_classes, "layers": layers, "hidden_fc_params": hidden,
          "hidden_fc_bytes_float32": hidden * 4, "hidden_fc_bytes_bfloat16": hidden * 2,
          "hidden_fc_fraction": hidden / total, "total_params": total,
          "total_bytes_float32": total * 4, "train_state_bytes_float32": 3 * total * 4}


# --- Output -----------------------------------------------------------------------------------------

def _mb(n_bytes: float) -> str:
  return f"{n_bytes / 1e6:,.1f} MB ({n_bytes / 2**20:,.1f} MiB)"


def _ratio(row, rows) -> str:
  nin = next(q["params"] for q in rows if q["model"] == "nin" and q["num_classes"] == row["num_classes"])
  ratio = row["params"] / nin
  return f"{ratio:.1f}×" if ratio >= 1 else f"{ratio:.3f}×"


def _table(header, rows) -> str:
  out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(out)


def markdown(claims: Sequence[str] = ("params", "1x1", "fc"), **one_by_one_kwargs) -> str:
  parts = []
  if "params" in claims:
    rows = param_counts()
    parts += ["### Claim 4: parameters (native geometry, exact)", "", _table(
        ["model", "input", "classes", "params", "vs NiN"],
        [[r["model"], f"{r['image_size']}²", r["num_classes"], f"{r['params']:,}",
          _ratio(r, rows)]
         for r in rows]), ""]
  if "1x1" in claims:
    r = one_by_one(**one_by_one_kwargs)
    parts += [f"### Claim 5: a 1×1 conv {r['c_in']}→{r['c_mid']} on a {r['size']}×{r['size']} map "
              f"before a {r['k']}×{r['k']} conv →{r['c_out']} (forward FLOPs per image, XLA)", "",
              f"1×1 output shape: {r['reduce_out_shape']} from input {r['in_shape']} (spatial size kept: "
              f"{r['reduce_out_shape'][1:3] == r['in_shape'][1:3]}).", "", _table(
                  ["", "GFLOPs"],
                  [[f"{r['k']}×{r['k']} conv on the {r['c_in']}-channel map (no 1×1)",
                    f"{r['flops_next_direct'] / 1e9:.4f}"],
                   [f"the 1×1 conv {r['c_in']}→{r['c_mid']}", f"{r['flops_1x1'] / 1e9:.4f}"],
                   [f"{r['k']}×{r['k']} conv on the {r['c_mid']}-channel map", f"{r['flops_next_after_1x1'] / 1e9:.4f}"],
                   ["1×1 + following conv (one program)", f"{r['flops_total_with_1x1'] / 1e9:.4f}"]]), "",
              f"Following layer: {r['next_layer_saving']:.2f}× fewer FLOPs; with the 1×1's own cost: "
              f"{r['total_saving']:.2f}× fewer.", ""]
  if "fc" in claims:
    for name in ("alexnet", "vgg11"):
      m = fc_memory(name)
      parts += [f"### Claim 6: the FC layers of {name} (native geometry, 1000 classes)", "", _table(
          ["layer", "kernel", "params", "float32", "bfloat16"],
          [[l["layer"], "×".join(map(str, l["kernel"])), f"{l['params']:,}", _mb(l["bytes_float32"]),
            _mb(l["bytes_bfloat16"])] for l in m["layers"]]), "",
          f"The two 4096-wide layers: {m['hidden_fc_params']:,} params = {_mb(m['hidden_fc_bytes_float32'])} "
          f"in float32, {_mb(m['hidden_fc_bytes_bfloat16'])} in bfloat16; "
          f"{100 * m['hidden_fc_fraction']:.1f}% of the model's {m['total_params']:,}. Training state in float32 "
          f"(params + gradients + momentum): {_mb(m['train_state_bytes_float32'])}.", ""]
  return "\n".join(parts)


_CLAIMS = flags.DEFINE_list("claims", ["params", "1x1", "fc"], "Which: params, 1x1, fc.")
_SIZE = flags.DEFINE_integer("size", 32, "1x1 claim: feature map side.")
_C_IN = flags.DEFINE_integer("c_in", 256, "1x1 claim: input channels.")
_C_MID = flags.DEFINE_integer("c_mid", 64, "1x1 claim: channels after the 1x1 conv.")
_C_OUT = flags.DEFINE_integer("c_out", 256, "1x1 claim: output channels of the following conv.")
_K = flags.DEFINE_integer("k", 3, "1x1 claim: kernel size of the following conv.")


def main(argv):
  del argv
  from cnn_jax import console  # pylint: disable=g-import-not-at-top
  console.quiet_libraries()  # JAX's backend-probing INFO lines only with --verbosity
  unknown = sorted(set(_CLAIMS.value) - {"params", "1x1", "fc"})
  if unknown:
    print(f"error: unknown --claims {unknown}; choose from params, 1x1, fc", file=sys.stderr)
    return 2
  print(markdown(_CLAIMS.value, size=_SIZE.value, c_in=_C_IN.value, c_mid=_C_MID.value,
                 c_out=_C_OUT.value, k=_K.value))
  return 0


if __name__ == "__main__":
  sys.exit(app.run(main))
