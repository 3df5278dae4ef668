"""Tests of the model zoo: exact architectures, geometries, switches, dtypes and the summary tools.

Param counts and native-resolution shapes use ``jax.eval_shape`` (no 62M-param allocation); the
numerical tests run width-reduced nets on 28-32 px inputs.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from cnn_jax import models
from cnn_jax import steps
from cnn_jax.errors import UserError
from cnn_jax.models import layers
from cnn_jax.models import summary

_FAMILY_EXAMPLES = ('lenet', 'alexnet', 'vgg11', 'vgg11_bn', 'nin')


def _init_shapes(model, size, channels=3):
  images = jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)


def _param_count(name, num_classes, size=None, channels=3, **kwargs):
  model = models.get_model(name, num_classes, **kwargs)
  size = size or models.native_resolution(name)
  return summary.count_params(_init_shapes(model, size, channels))


def _logits_shape(name, num_classes, size, channels=3, **kwargs):
  model = models.get_model(name, num_classes, **kwargs)
  images = jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32)
  variables = _init_shapes(model, size, channels)
  return jax.eval_shape(lambda v, x: model.apply(v, x), variables, images)


def _init(model, images, seed=0):
  """Jitted ``model.init``: one compile instead of eager op-by-op dispatch (slow on a busy CPU), at the
  init's LLVM -O2 (``steps.init_compiler_options``: the same values, compiled 1.6-5x faster)."""
  return jax.jit(model.init, compiler_options=steps.init_compiler_options())(jax.random.key(seed), images)


@functools.lru_cache(maxsize=None)
def _small_net_variables(name, size=32, channels=3):
  """Variables of ``name`` at small geometry, width 0.25, shared by tests (init compiles slowly)."""
  model = models.get_model(name, 10, geometry='small', width=0.25)
  return _init(model, _images(size, channels))


def _apply(model, variables, images, rngs=None, **kwargs):
  """Jitted ``model.apply(variables, images, rngs=rngs, **kwargs)``; kwargs are static."""
  return jax.jit(functools.partial(model.apply, **kwargs))(variables, images, rngs=rngs)


def _images(size, channels=3, batch=2, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, channels), jnp.float32)


@pytest.mark.parametrize('name, num_classes, kwargs, expected', [
    ('alexnet', 1000, {}, 62_378_344),
    ('alexnet', 10, {}, 58_322_314),
    ('alexnet', 1000, {'groups': 2}, 60_965_224),  # The paper's two-GPU split.
    ('alexnet', 1000, {'lrn': True}, 62_378_344),  # LRN has no params.
    ('vgg11', 1000, {}, 132_863_336),
    ('vgg13', 1000, {}, 133_047_848),
    ('vgg16', 1000, {}, 138_357_544),
    ('vgg19', 1000, {}, 143_667_240),
    ('vgg11_bn', 1000, {}, 132_868_840),  # + scale and bias of 8 BatchNorms (torchvision count).
    ('nin', 1000, {}, 7_439_608),
    ('nin', 10, {}, 2_015_398),
])
def test_param_counts_at_native_resolution(name, num_classes, kwargs, expected):
  assert _param_count(name, num_classes, **kwargs) == expected


def test_lenet_param_count():
  # conv 5*5*1*6+6, conv 5*5*6*16+16, FC 400*120+120, 120*84+84, 84*10+10.
  assert _param_count('lenet', 10, size=28, channels=1) == 156 + 2416 + 48120 + 10164 + 850


def test_nin_without_1x1_convs_counts_only_the_kxk_convs():
  expected = ((11 * 11 * 3 * 96 + 96) + (5 * 5 * 96 * 256 + 256) + (3 * 3 * 256 * 384 + 384)
              + (3 * 3 * 384 * 10 + 10))
  assert _param_count('nin', 10, use_1x1=False) == expected


def test_nin_fc_head_adds_a_dense_layer_on_the_flattened_last_block():
  # 224 px: 54 -> 26 -> 12 -> 5, so the head flattens 5x5x10.
  assert _param_count('nin', 10, head='fc') == 2_015_398 + (5 * 5 * 10 * 10 + 10)


def test_width_scales_convs_and_hidden_fc_but_not_logits():
  variables = _init_shapes(models.get_model('vgg11', 10, width=0.25), 32)
  params = variables['params']
  assert params['block1_conv1']['kernel'].shape == (3, 3, 3, 16)
  assert params['block5_conv2']['kernel'].shape == (3, 3, 128, 128)
  assert params['head']['fc1']['kernel'].shape == (128, 1024)
  assert params['head']['logits']['kernel'].shape == (1024, 10)
  nin_params = _init_shapes(models.get_model('nin', 7, width=0.1), 224)['params']
  assert nin_params['block1']['conv']['kernel'].shape == (11, 11, 3, 10)  # round(9.6)
  assert nin_params['block4']['mlp2']['kernel'].shape == (1, 1, 7, 7)  # num_classes kept.


@pytest.mark.parametrize('name', ['alexnet', 'vgg11', 'vgg16_bn', 'nin', 'lenet'])
def test_logits_shape_at_native_resolution(name):
  channels = 1 if name == 'lenet' else 3
  logits = _logits_shape(name, 1000, models.native_resolution(name), channels)
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32


@pytest.mark.parametrize('name', _FAMILY_EXAMPLES)
@pytest.mark.parametrize('size', [28, 32, 64])
def test_small_geometry_logits_shape(name, size):
  logits = _logits_shape(name, 10, size, geometry='small', width=0.25)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32


@pytest.mark.parametrize('name', _FAMILY_EXAMPLES)
def test_small_geometry_forward_is_finite(name):
  model = models.get_model(name, 10, geometry='small', width=0.25)
  size, channels = (28, 1) if name == 'lenet' else (32, 3)
  logits = _apply(model, _small_net_variables(name, size, channels), _images(size, channels))
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits)) and np.std(logits) > 0


@pytest.mark.parametrize('name, geometry, expected', [
    ('alexnet', 'native', 67), ('alexnet', 'small', 15),
    ('nin', 'native', 67), ('nin', 'small', 15),
    ('vgg11', 'native', 32), ('vgg19_bn', 'small', 1),
    ('lenet', 'native', 12), ('lenet', 'small', 12),
])
def test_min_input_size_is_tight(name, geometry, expected):
  assert models.min_input_size(name, geometry) == expected
  model = models.get_model(name, 10, geometry=geometry, width=0.25)
  # At the minimum the net traces; one pixel less raises a UserError naming the minimum.
  assert _logits_shape(name, 10, expected, geometry=geometry, width=0.25).shape == (2, 10)
  if expected > 1:
    with pytest.raises(UserError, match=f'at least {expected}x{expected} px'):
      _init(model, jnp.zeros((1, expected - 1, expected - 1, 3)))


def test_too_small_input_error_names_minimum_and_fix():
  with pytest.raises(UserError) as err:
    models.check_input_size('alexnet', 32, 'native')
  message = str(err.value)
  assert 'alexnet (native geometry) needs inputs of at least 67x67 px; got 32x32' in message
  assert 'geometry=small' in message and '\n' not in message
  models.check_input_size('alexnet', 32, 'small')  # Fine.
  with pytest.raises(UserError, match='at least 15x15 px; got 14x40'):
    models.check_input_size('nin', (14, 40), 'small')


def test_unknown_names_raise_user_errors_listing_choices():
  with pytest.raises(UserError, match='Unknown model .*resnet.*alexnet.*vgg11_bn'):
    models.get_model('resnet', 10)
  with pytest.raises(UserError, match='Unknown activation .*swishy.*relu'):
    models.get_model('alexnet', 10, activation='swishy')
  with pytest.raises(UserError, match='Unknown kwarg.*lrn.*vgg11.*valid:.*width'):
    models.get_model('vgg11', 10, lrn=True)
  with pytest.raises(UserError, match='geometry'):
    models.get_model('nin', 10, geometry='tiny')
  with pytest.raises(UserError, match='head'):
    models.get_model('nin', 10, head='mlp')
  with pytest.raises(UserError, match='width'):
    models.get_model('lenet', 10, width=0.0)
  assert len(models.MODELS) == 11 and 'vgg19_bn' in models.MODELS


def test_grouped_conv_with_indivisible_channels_raises_user_error():
  model = models.get_model('alexnet', 10, geometry='small', groups=2, width=0.01)  # 1 channel.
  with pytest.raises(UserError, match='divisible by groups=2'):
    _init(model, jnp.zeros((1, 32, 32, 3)))


def test_local_response_norm_matches_paper_formula():
  x = np.asarray(jax.random.normal(jax.random.key(1), (2, 3, 4, 7)), np.float64) * 30.0
  k, n, alpha, beta = 2.0, 5, 1e-4, 0.75
  expected = np.empty_like(x)
  channels = x.shape[-1]
  for c in range(channels):
    window = x[..., max(0, c - n // 2):min(channels, c + n // 2 + 1)]
    expected[..., c] = x[..., c] / (k + alpha * np.sum(window ** 2, axis=-1)) ** beta
  lrn = layers.LocalResponseNorm(size=n, k=k, alpha=alpha, beta=beta)
  got = lrn.apply({}, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert not np.allclose(expected, x / k ** beta)  # The window term matters at this scale.


def test_grouped_conv_equals_two_half_convs_concatenated():
  x = _images(9, channels=6)
  conv = layers.Conv(features=4, kernel_size=3, feature_group_count=2)
  variables = _init(conv, x, seed=2)
  kernel, bias = variables['params']['kernel'], variables['params']['bias']
  assert kernel.shape == (3, 3, 3, 4)

  def reference_conv(inputs, w):
    return lax.conv_general_dilated(inputs, w, (1, 1), 'SAME',
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  expected = jnp.concatenate([reference_conv(x[..., :3], kernel[..., :2]),
                              reference_conv(x[..., 3:], kernel[..., 2:])], axis=-1) + bias
  np.testing.assert_allclose(_apply(conv, variables, x), expected, rtol=1e-5, atol=1e-5)


def test_alexnet_lrn_and_groups_change_the_function():
  images = _images(32)
  plain = models.get_model('alexnet', 10, geometry='small', width=0.25)
  variables = _small_net_variables('alexnet')
  with_lrn = models.get_model('alexnet', 10, geometry='small', width=0.25, lrn=True)
  assert not np.allclose(_apply(plain, variables, images * 50),
                         _apply(with_lrn, variables, images * 50))
  grouped = models.get_model('alexnet', 10, geometry='small', width=0.25, groups=2)
  grouped_params = _init_shapes(grouped, 32)['params']
  assert grouped_params['conv2']['kernel'].shape == (5, 5, 12, 64)
  assert grouped_params['conv3']['kernel'].shape == (3, 3, 64, 96)  # conv3 is not grouped.


def test_activation_is_configurable():
  images = _images(28, channels=1)
  relu_net = models.get_model('lenet', 10, geometry='small', width=0.25)
  variables = _small_net_variables('lenet', 28, 1)
  sigmoid_net = models.get_model('lenet', 10, geometry='small', width=0.25, activation='sigmoid')
  assert not np.allclose(_apply(relu_net, variables, images),
                         _apply(sigmoid_net, variables, images))


def test_dropout_is_active_only_in_train_mode():
  model = models.get_model('alexnet', 10, geometry='small', width=0.25)
  images = _images(32)
  variables = _small_net_variables('alexnet')
  eval_a = _apply(model, variables, images, train=False)
  eval_b = _apply(model, variables, images)
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a = _apply(model, variables, images, rngs={'dropout': jax.random.key(1)}, train=True)
  train_b = _apply(model, variables, images, rngs={'dropout': jax.random.key(2)}, train=True)
  assert not np.allclose(train_a, eval_a)
  assert not np.allclose(train_a, train_b)
  no_dropout = models.get_model('alexnet', 10, geometry='small', width=0.25, dropout_rate=0.0)
  np.testing.assert_allclose(
      _apply(no_dropout, variables, images, rngs={'dropout': jax.random.key(1)}, train=True),
      eval_a, rtol=1e-6)


def test_the_papers_dropout_is_each_familys_default():
  # LeNet has none; AlexNet/VGG drop 0.5 in the FC head, NiN 0.5 before its last block. A kwarg of None
  # (the shared config's "family default") gives exactly that.
  expected = {'lenet': 0.0, 'alexnet': 0.5, 'vgg11': 0.5, 'vgg11_bn': 0.5, 'nin': 0.5}
  for name, rate in expected.items():
    assert models.get_model(name, 10, dropout_rate=None).dropout_rate == rate
    arch = models.architecture(name, geometry='small', width=0.25, dropout_rate=None, dtype=jnp.bfloat16)
    assert arch['dropout_rate'] == rate and arch['model'] == name and 'dtype' not in arch
    assert arch['init'] == layers.ImageClassifier.INIT
  assert models.architecture('alexnet')['lrn'] is False and models.architecture('nin')['head'] == 'gap'
  assert models.architecture('lenet', dropout_rate=0.3)['dropout_rate'] == 0.3
  lenet = models.get_model('lenet', 10, geometry='small', width=0.25)
  images = _images(28, 1)
  variables = _small_net_variables('lenet', 28, 1)
  np.testing.assert_array_equal(  # no dropout: train mode computes the eval function
      _apply(lenet, variables, images, rngs={'dropout': jax.random.key(1)}, train=True),
      _apply(lenet, variables, images))


def test_bfloat16_computes_in_bf16_with_float32_params_and_logits():
  model = models.get_model('nin', 10, geometry='small', width=0.25, dtype=jnp.bfloat16)
  images = _images(32)
  variables = _small_net_variables('nin')  # The same params as at float32.
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  logits, state = _apply(model, variables, images, capture_intermediates=True,
                         mutable=['intermediates'])
  assert logits.dtype == jnp.float32
  assert state['intermediates']['block2']['conv']['__call__'][0].dtype == jnp.bfloat16
  reference = _apply(models.get_model('nin', 10, geometry='small', width=0.25), variables, images)
  np.testing.assert_allclose(logits, reference, rtol=0.1, atol=0.05)


def test_batch_norm_variant_updates_batch_stats_in_train_mode():
  model = models.get_model('vgg11_bn', 10, geometry='small', width=0.25)
  images = _images(32) * 3.0 + 1.0
  variables = _small_net_variables('vgg11_bn')
  stats = variables['batch_stats']
  assert set(stats['block1_bn1']) == {'mean', 'var'}
  assert 'block1_bn1' in variables['params']
  plain_params = _init_shapes(models.get_model('vgg11', 10, geometry='small', width=0.25), 32)
  assert 'batch_stats' not in plain_params and 'block1_bn1' not in plain_params['params']
  _, updates = _apply(model, variables, images, rngs={'dropout': jax.random.key(1)}, train=True,
                      mutable=['batch_stats'])
  new_mean = updates['batch_stats']['block1_bn1']['mean']
  assert not np.allclose(new_mean, stats['block1_bn1']['mean'])
  # momentum 0.9: new = 0.9 * old (zeros) + 0.1 * batch mean of conv1's output.
  conv_out = _apply(model, variables, images, capture_intermediates=True,
                    mutable=['intermediates'])[1]['intermediates']['block1_conv1']['__call__']
  np.testing.assert_allclose(new_mean, 0.1 * conv_out[0].mean(axis=(0, 1, 2)), rtol=1e-4,
                             atol=1e-6)
  # Eval mode uses the running averages and needs no mutable collection.
  assert _apply(model, variables, images, train=False).shape == (2, 10)


def test_count_params_accepts_variables_or_params():
  variables = _small_net_variables('lenet', 28, 1)
  # width 0.25: conv 5*5*1*2+2, conv 5*5*2*4+4, FC 100*30+30, 30*21+21, 21*10+10.
  expected = 52 + 204 + 3030 + 651 + 220
  assert summary.count_params(variables) == summary.count_params(variables['params']) == expected


def test_flops_per_example_is_close_to_a_hand_count():
  model = models.get_model('lenet', 10)
  variables = _init_shapes(model, 28, channels=1)
  flops = summary.flops_per_example(model, variables, 28, channels=1)
  macs = (28 * 28 * 25 * 6) + (10 * 10 * 150 * 16) + 400 * 120 + 120 * 84 + 84 * 10
  # XLA skips conv taps on SAME padding and adds elementwise ops (bias, relu, pooling).
  assert 0.85 * 2 * macs < flops < 1.15 * 2 * macs
  train_flops = summary.flops_per_example(model, variables, 28, train=True, channels=1)
  assert train_flops >= flops


@pytest.mark.parametrize('name', ['lenet', 'nin'])
def test_flops_per_example_without_compiling_equals_the_compiled_count(name, backend_compiles):
  """flops_per_example counts the lowered forward (no XLA compile): the very count of the compiled one."""
  from cnn_jax import perf  # pylint: disable=g-import-not-at-top
  model = models.get_model(name, 10, geometry='small', width=0.25)
  size, channels = (28, 1) if name == 'lenet' else (32, 3)
  variables = _init_shapes(model, size, channels)
  compiled = perf.host_cpu_flops(jax.jit(lambda v, x: model.apply(v, x, train=False)), variables,
                                 jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32))
  with backend_compiles() as compiles:
    counted = summary.flops_per_example(model, variables, size, channels=channels)
  assert counted == compiled > 0
  assert not compiles, compiles  # counted without an XLA compile


def test_summarize_lists_layers_in_call_order_with_totals():
  table = summary.summarize('alexnet', 10, 32, geometry='small', width=0.25)
  lines = table.splitlines()
  paths = [line.split()[0] for line in lines[3:-3]]
  assert paths[:4] == ['conv1', 'pool1', 'conv2', 'pool2']
  assert paths[-1] == 'head/logits'
  assert any(line.split()[:3] == ['pool5', '1x3x3x64', '0'] for line in lines)
  total = summary.count_params(_init_shapes(
      models.get_model('alexnet', 10, geometry='small', width=0.25), 32))
  assert f'total params: {total:,}' in table
  assert 'GFLOPs' in table and 'bfloat16' in table
