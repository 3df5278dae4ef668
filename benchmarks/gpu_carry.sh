#!/usr/bin/env bash
# Prepares, here (where pip, TensorFlow and the dataset are), what benchmarks/gpu_campaign.sh needs on a GPU machine
# that has neither, in two git-ignored folders of the repo root that the device run must carry:
#   .whl/     pure-Python wheels the GPU image lacks: ml-collections and dm-pix (their own needs, absl-py, PyYAML
#             and chex, are on the image), for Python 3.12
#   .arrays/  the Fashion-MNIST array cache (uint8 .npy + checksums, cnn_jax/data/arrays.py): the device input
#             reads it with numpy alone, so the GPU run needs no TensorFlow
# and checks that the tree that travels (tracked + untracked-not-ignored files, shared/) plus these two is under the
# device's 64 MiB. A tracked file missing from the working tree stops it first, with the file's name.
#
#   bash benchmarks/gpu_carry.sh [--data_dir=PREPARED_TFDS_DIR] [--manual_dir=FASHION_MNIST_FILES]
#
# --data_dir defaults to $CNN_JAX_TFDS_DATA_DIR (else tfds's default); --manual_dir to
# $CNN_JAX_FASHION_MNIST_MANUAL_DIR, else ../shared/data/fashion_mnist beside the repo, used to prepare the tfds
# data first if it is not prepared yet. PYTHON (default: python) must have the project's requirements installed;
# PIP (default: "$PYTHON -m pip") downloads the wheels. Then, on the device: carry [".whl", ".arrays"].
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python}
PIP=${PIP:-"$PY -m pip"}
DATA_DIR=${CNN_JAX_TFDS_DATA_DIR:-}
MANUAL_DIR=${CNN_JAX_FASHION_MNIST_MANUAL_DIR:-$REPO/../shared/data/fashion_mnist}
LIMIT=$((64 * 1024 * 1024))
WHEELS=("ml-collections==1.1.0" "dm-pix==0.4.5")

for arg in "$@"; do
  case $arg in
    --data_dir=*) DATA_DIR=${arg#*=} ;;
    --manual_dir=*) MANUAL_DIR=${arg#*=} ;;
    *) echo "error: unknown argument '$arg'; usage: bash benchmarks/gpu_carry.sh [--data_dir=DIR] [--manual_dir=DIR]" >&2
       exit 2 ;;
  esac
done

for path in .whl .arrays; do
  if ! git check-ignore -q "$path/any_file"; then
    echo "error: $path is not git-ignored here; add /$path/ to .gitignore first (it must never be committed)" >&2
    exit 2
  fi
done

# Before anything is downloaded: every tracked file must be there. `git ls-files --cached` lists a tracked file
# that was deleted from the working tree (e.g. a committed plot removed by `report.py --out=docs/results/...` when
# it had nothing to draw), and the size check below could not measure it.
missing=$(git ls-files --deleted)
if [ -n "$missing" ]; then
  echo "error: $(printf '%s\n' "$missing" | wc -l) tracked file(s) are missing from the working tree:" >&2
  printf '%s\n' "$missing" | head -n 10 | sed 's/^/   /' >&2
  echo "   restore them (git checkout -- FILE) or commit their deletion, then run this again" >&2
  exit 1
fi

echo "== wheels -> .whl/"
mkdir -p .whl
# --no-deps: their needs (absl-py, PyYAML, chex) are on the GPU image. One version of each: two stop the install.
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}" 2>&1 | grep -v "^WARNING: Location" || true
for wheel in "${WHEELS[@]}"; do
  stem=$(echo "${wheel%%==*}" | tr '-' '_')
  version=${wheel##*==}
  if ! compgen -G ".whl/${stem}-${version}-*.whl" > /dev/null; then
    echo "error: pip did not download $wheel into .whl/" >&2
    exit 1
  fi
  for other in .whl/"${stem}"-*.whl; do
    case $other in
      .whl/"${stem}-${version}"-*) ;;
      *) echo "   removing $other (another version of $stem)"; rm -f "$other" ;;
    esac
  done
done
ls -l .whl

echo "== Fashion-MNIST array cache -> .arrays/"
args=(--dataset=fashion_mnist --arrays --array_cache_dir="$REPO/.arrays")
if [ -n "$DATA_DIR" ]; then args+=(--data_dir="$DATA_DIR"); fi
if [ -d "$MANUAL_DIR" ]; then args+=(--manual_dir="$MANUAL_DIR"); fi
"$PY" -m cnn_jax.data.prepare "${args[@]}"

echo "== size of what travels (limit 64 MiB)"
if ! sizes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s --); then
  echo "error: could not read the size of every file git lists (stat's message above names them)" >&2
  exit 1
fi
tree=$(printf '%s\n' "$sizes" | awk '{s += $1} END {print s + 0}')
shared=0
if [ -d shared ]; then shared=$(du -sb shared | cut -f1); fi
whl=$(du -sb .whl | cut -f1)
arrays=$(du -sb .arrays | cut -f1)
total=$((tree + shared + whl + arrays))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "   tree $(mib "$tree") + shared/ $(mib "$shared") + .whl $(mib "$whl") + .arrays $(mib "$arrays") = $(mib "$total")"
if [ "$total" -gt "$LIMIT" ]; then
  echo "error: $(mib "$total") is over the device's 64 MiB: remove untracked files from the tree or carry less" >&2
  exit 1
fi
echo "   ok. On the device: run(command='bash benchmarks/gpu_campaign.sh \$OUT', carry=['.whl', '.arrays'])"
