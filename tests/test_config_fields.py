"""Configs: every field the code reads is declared, one recipe for every family, the quick start.

A field read with `config.get("x", default)` but not declared in configs/common.py cannot be set from the
command line and is fingerprinted as null; the scan below finds every such read in the code that handles
the experiment config (attribute reads, `.get("...")`, `["..."]`, and aliases like `opt = config.optimizer`).
"""

import ast
import dataclasses
import glob
import os

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from cnn_jax import fingerprint as fp_lib
from cnn_jax.data import augment
from configs import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILY_CONFIGS = ("alexnet", "vgg", "nin", "lenet")
# ConfigDict methods, not fields.
_METHODS = {"get", "to_dict", "to_json", "to_json_best_effort", "copy_and_resolve_references", "update",
            "keys", "values", "items", "lock", "unlock", "unlocked", "ignore_type", "get_ref", "get_oneway_ref"}
# Files that read the experiment config (a variable named `config` elsewhere may be something else, e.g.
# the flags of models/summary.py).
_SCANNED = ("cnn_jax/train.py", "cnn_jax/steps.py", "cnn_jax/checkpoint.py", "cnn_jax/predict.py",
            "cnn_jax/data/*.py", "cnn_jax/compare/*.py", "cnn_jax/fingerprint.py")


def _dotted(node, aliases):
  """'optimizer.learning_rate' for config.optimizer.learning_rate, config['optimizer'].learning_rate,
  config.get('optimizer').learning_rate or, with an alias opt = config.optimizer, opt.learning_rate."""
  if isinstance(node, ast.Name):
    if node.id == "config":
      return ""
    return aliases.get(node.id)
  if isinstance(node, ast.Attribute):
    base = _dotted(node.value, aliases)
    return None if base is None else (f"{base}.{node.attr}" if base else node.attr)
  if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(
      node.slice.value, str):
    base = _dotted(node.value, aliases)
    return None if base is None else (f"{base}.{node.slice.value}" if base else node.slice.value)
  if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
      and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
    base = _dotted(node.func.value, aliases)
    return None if base is None else (f"{base}.{node.args[0].value}" if base else node.args[0].value)
  return None


def config_reads(source: str):
  """Dotted config fields `source` reads: config.a.b, config.get('a'), config['a'], alias.b."""
  tree = ast.parse(source)
  aliases = {}
  for node in ast.walk(tree):  # e.g. `opt = config.optimizer`
    if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Attribute)):
      path = _dotted(node.value, aliases)
      if path and path.split(".")[-1] not in _METHODS:
        aliases[node.targets[0].id] = path
  reads = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)) and not isinstance(
        getattr(node, "ctx", None), ast.Store):
      path = _dotted(node, aliases)
      if path:
        reads.add(path)
  fields = set()
  for path in reads:
    parts = [p for p in path.split(".") if p]
    while parts and parts[-1] in _METHODS:
      parts.pop()
    if parts:
      fields.add(".".join(parts))
  return fields


def _declared(config, dotted):
  node = config
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def test_the_scan_finds_undeclared_reads():
  # The scanner itself: it must see through .get, [], nesting and aliases (else the next test proves nothing).
  reads = config_reads("x = config.get('cache_max_gb', 4)\nopt = config.optimizer\ny = opt.momentum\n"
                       "z = config['augment'].flip\nconfig.model_kwargs.to_dict()\n")
  assert reads == {"cache_max_gb", "optimizer", "optimizer.momentum", "augment", "augment.flip",
                   "model_kwargs"}
  old = ml_collections.ConfigDict(dict(cache=True))  # the shape of the config before the fields were declared
  assert not _declared(old, "cache_max_gb")


def test_every_config_field_the_code_reads_is_declared_in_common():
  config = common.get_config()
  files = sorted({f for pattern in _SCANNED for f in glob.glob(os.path.join(REPO, pattern))})
  assert len(files) > 8
  missing = {}
  for path in files:
    with open(path) as f:
      for field in config_reads(f.read()):
        # Fields below model_kwargs are the families' own (declared by their config file).
        if field.startswith("model_kwargs.") or _declared(config, field):
          continue
        missing.setdefault(field, []).append(os.path.relpath(path, REPO))
  assert not missing, f"config fields read but not declared in configs/common.py: {missing}"


def test_every_augment_setting_is_declared():
  declared = set(common.get_config().augment)
  assert {f.name for f in dataclasses.fields(augment.AugmentSettings)} == declared


def test_pipeline_fields_can_be_set_from_the_command_line():
  argv = ["train.py", f"--config={os.path.join(REPO, 'configs/nin.py')}:smoke", "--config.normalize=none",
          "--config.data_threads=1", "--config.deterministic=False", "--config.cache_max_gb=0.5",
          "--config.model_kwargs.dropout_rate=0.3"]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
  values(argv)
  config = values.config
  assert (config.normalize, config.data_threads, config.deterministic, config.cache_max_gb) == (
      "none", 1, False, 0.5)
  assert config.model_kwargs.dropout_rate == 0.3
  fields = fp_lib.fingerprint_fields(config)
  assert fields["normalize"] == "none" and fields["deterministic"] is False


# --- One recipe, the architecture's own defaults ---------------------------------------------------

def _family_config(name, arg=None):
  return sweep_load(f"configs/{name}.py" + (f":{arg}" if arg else ""))


def sweep_load(spec):
  from cnn_jax.compare import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  return sweep_lib.load_config(spec)


@pytest.mark.parametrize("arg", [None, "small", "quick"])
def test_every_family_config_shares_one_recipe(arg):
  recipes = {}
  for name in FAMILY_CONFIGS:
    fields = fp_lib.fingerprint_fields(_family_config(name, arg))
    fields.pop("image_size")  # the native resolution is the family's (227 AlexNet, 28 LeNet, 224 others)
    recipes[name] = fields
  first = recipes["alexnet"]
  for name, fields in recipes.items():
    assert fields == first, (name, {k: (v, first[k]) for k, v in fields.items() if v != first[k]})
  assert first["optimizer"]["learning_rate"] == 0.01


def test_dropout_and_init_are_the_architectures_own():
  archs = {name: fp_lib.architecture(_family_config(name, "small")) for name in FAMILY_CONFIGS}
  assert {n: a["dropout_rate"] for n, a in archs.items()} == {"alexnet": 0.5, "vgg": 0.5, "nin": 0.5,
                                                               "lenet": 0.0}
  assert len({a["init"] for a in archs.values()}) == 1 and "He normal" in archs["nin"]["init"]
  # Set explicitly, the study's value wins, and it is an architecture field, not a recipe one.
  config = common.get_config("small", model="lenet")
  config.model_kwargs.dropout_rate = 0.5
  assert fp_lib.architecture(config)["dropout_rate"] == 0.5
  assert fp_lib.fingerprint(config)["hash"] == fp_lib.fingerprint(common.get_config("small", model="lenet"))["hash"]
  assert set(fp_lib.RECIPE_FIELDS).isdisjoint(fp_lib.ARCHITECTURE_FIELDS)


def test_quick_is_small_at_quarter_width_for_three_epochs():
  vgg = _family_config("vgg", "quick")
  assert (vgg.model_kwargs.geometry, vgg.image_size, vgg.model_kwargs.width, vgg.num_epochs) == (
      "small", 32, 0.25, 3)
  assert vgg.augment.crop == "pad_random_crop"
  lenet = _family_config("lenet", "quick")
  assert lenet.model_kwargs.width == 1.0  # LeNet is the baseline at its own size
  assert _family_config("vgg", "quick,epochs=5").num_epochs == 5  # explicit args win


def test_download_is_on_by_default():
  assert common.get_config().download is True
