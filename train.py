r"""Trains one of cnn_jax's networks.

  python train.py --config=configs/nin.py --workdir=runs/nin
  python train.py --config=configs/alexnet.py:small,dataset=cifar10 --workdir=runs/alexnet \
      --config.batch_size=256

Multi-process (one process per host): see README, "Beyond one machine".
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:args]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summaries.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for multi-process runs without a cluster launcher.")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "auto: join jax.distributed when a coordinator is given or SLURM/Open MPI/Cloud TPU/"
                  "Kubernetes is detected; on: always (JAX auto-detects the cluster); off: never.")
flags.DEFINE_integer("cpu_devices", None, "Number of (fake) CPU devices, for testing meshes on one CPU.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # library INFO chatter (Orbax, tfds) stays out of the way
  # Imported here so `--help` and flag errors do not pay for JAX/TF start-up.
  from cnn_jax import cli  # pylint: disable=g-import-not-at-top
  status = cli.run(cli.setup_runtime, FLAGS.coordinator_address, FLAGS.num_processes,
                   FLAGS.process_id, FLAGS.cpu_devices, FLAGS.distributed)
  return status or cli.run(cli.train_main, FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  sys.exit(app.run(main))
