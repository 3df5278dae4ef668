"""Test-session set-up that must happen before JAX initialises: JAX on the CPU only, 8 fake CPU devices, a temp
array cache, a session-wide XLA compilation cache.

Every test then runs its jitted steps over a real 8-device mesh (the batch split on `data`), which is how
sharding bugs show up on a laptop. CNN_JAX_TEST_DEVICES overrides the count.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The suite runs on the CPU. With requirements-compile.txt installed (CI installs it), JAX would otherwise also
# try the CUDA plugin (a "cuDNN not found" traceback on every start without a GPU) and libtpu (warnings about
# TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES) in this process and in every train.py it launches.
# tests/test_compile_check.py compiles for GPUs and TPUs through compile-only devices, which need neither.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Array caches (the device input's decoded splits) of the whole session go to one temporary folder, never
# beside a shared tfds data dir; train.py subprocesses inherit it.
if "CNN_JAX_ARRAY_CACHE_DIR" not in os.environ:
  os.environ["CNN_JAX_ARRAY_CACHE_DIR"] = tempfile.mkdtemp(prefix="cnn_jax_arrays_")
  atexit.register(shutil.rmtree, os.environ["CNN_JAX_ARRAY_CACHE_DIR"], True)

# One persistent XLA compilation cache for the session, in-process and in train.py subprocesses (they
# inherit the environment). The suite builds the same small programs many times over: every in-process run
# of one config creates new jitted functions (so JAX's in-memory cache misses), and relaunched subprocesses
# start empty. A hit loads the very executable the miss compiled, so numbers are unchanged. Only programs
# that took >= 0.5 s to compile are stored (the init and the steps; not the many tiny eager ops).
# CNN_JAX_TEST_COMPILATION_CACHE names a folder that is kept across sessions.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = os.environ.get("CNN_JAX_TEST_COMPILATION_CACHE") or tempfile.mkdtemp(prefix="cnn_jax_xla_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  if not os.environ.get("CNN_JAX_TEST_COMPILATION_CACHE"):
    atexit.register(shutil.rmtree, _cache, True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top

jax.config.update("jax_num_cpu_devices", int(os.environ.get("CNN_JAX_TEST_DEVICES", "8")))

# TensorFlow (GPUs hidden from it) is imported by tests/conftest.py's session fixture, in the processes that run
# tests: not here, where pytest-xdist's controller (which runs none) would spend ~7 CPU-seconds on it before it
# starts the workers.
