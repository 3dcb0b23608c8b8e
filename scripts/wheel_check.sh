#!/usr/bin/env bash
# Install the project the way a user does: build the wheel, install it (not editable) into a
# fresh venv, and run the console script from an empty directory. A file the wheel lacks (conf/,
# the bundled sample) or a path into the checkout fails here, not on a user's machine.
# Usage: scripts/wheel_check.sh (from anywhere; dependencies come through pip's cache).
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d "${TMPDIR:-/tmp}/wheel_check.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Built from a copy of what the build reads: a build/ left in the checkout by an earlier build
# would put its stale files into the wheel.
mkdir "$work/src"
cp -r pyproject.toml README.md pipeline conf "$work/src/"
python3 -m pip wheel --quiet --no-deps -w "$work/wheel" "$work/src"
wheels=("$work"/wheel/pipeline-*.whl)
listing=$(python3 -m zipfile -l "${wheels[0]}")
for member in pipeline/conf/config.yaml pipeline/sample/mnist_sample.npz pipeline/templates/report.html; do
  grep -q "^$member " <<<"$listing" || { echo "wheel check: $member is not in the wheel" >&2; exit 1; }
done

python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet "${wheels[0]}"

mkdir "$work/empty"
cd "$work/empty"
# Only the installed package may be found: nothing from the checkout or the caller's venv.
unset PYTHONPATH VIRTUAL_ENV
export TF_CPP_MIN_LOG_LEVEL=3
"$work/venv/bin/python" -c 'import pipeline, sys; sys.exit("/site-packages/pipeline/" not in pipeline.__file__)'

pipeline="$work/venv/bin/pipeline"
"$pipeline" --version
"$pipeline" train data=sample model=mlp fit.epochs=1
"$pipeline" status
# With one run under outputs/, predict needs no overrides to find it.
"$pipeline" predict --test-index 0
echo "wheel check: OK"
