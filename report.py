r"""Compares runs trained under one pipeline: Markdown + CSV tables and PNG plots.

  python report.py --runs='runs/families/*' --out=runs/report_families
  python report.py --runs=runs/nin_a,runs/nin_b --out=runs/report_nin --allow_mismatch

--out must be a new folder or the earlier report of the same runs (--overwrite replaces anything else); a
report only ever removes files an earlier report wrote (it lists them in <out>/.report.json).

Before comparing, the runs' pipeline/recipe fingerprints (run_info.json) must agree apart from the seed
and the fields their sweep varies; otherwise it stops and names the differing fields.
"""

import sys

from absl import app
from absl import flags

_RUNS = flags.DEFINE_list("runs", [], "Run folders, globs (quote them) or sweep roots; also positional.")
_OUT = flags.DEFINE_string("out", None, "Folder for report.md, runs.csv, groups.csv and the PNG plots.")
_EXPECT = flags.DEFINE_bool("expect_identical", True,
                            "Require one pipeline/recipe across runs (seed and sweep-studied fields aside).")
_ALLOW = flags.DEFINE_bool("allow_mismatch", False, "Report differing pipelines anyway, with a loud warning.")
_VARY = flags.DEFINE_list("vary", [], "Extra fingerprint fields expected to differ (e.g. optimizer.learning_rate).")
_PLOTS = flags.DEFINE_bool("plots", True, "Write the PNG plots.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Write into an --out that holds another report or other files.")
_TARGET = flags.DEFINE_float("target_top1", 0.9, "Report the epochs and wall time each run took to reach this test top-1.")
flags.mark_flags_as_required(["out"])


def _main(patterns):
  from cnn_jax import console  # pylint: disable=g-import-not-at-top
  console.quiet_libraries()
  from cnn_jax.compare import report as report_lib  # pylint: disable=g-import-not-at-top
  from cnn_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  if not patterns:
    raise UserError("no runs given: pass --runs='runs/families/*' (or run folders as arguments)")
  report_lib.report(patterns, _OUT.value, expect_identical=_EXPECT.value, allow_mismatch=_ALLOW.value,
                    allowed=_VARY.value, plots=_PLOTS.value, target=_TARGET.value, overwrite=_OVERWRITE.value,
                    log=lambda m: print(m, file=sys.stderr if m.startswith("WARNING") else sys.stdout))
  return 0


def main(argv):
  from cnn_jax import cli  # pylint: disable=g-import-not-at-top
  return cli.run(_main, list(_RUNS.value) + list(argv[1:]))


if __name__ == "__main__":
  sys.exit(app.run(main))
