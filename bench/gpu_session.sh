#!/usr/bin/env bash
# Issue 5's checks as one device command (bench/GPU.md): the study benchmark, then, while the
# call's time lasts, the prefill and decode profile and the pixel benchmark. Each writes to $OUT
# as it goes, so a call cut short still brings back what it measured.
#
#   bash bench/gpu_session.sh COMMIT [STUDY_BUDGET_S] [CALL_LIMIT_S]    # defaults 400 and 560
set -uo pipefail
commit=${1:?usage: bash bench/gpu_session.sh COMMIT [STUDY_BUDGET_S] [CALL_LIMIT_S]}
budget=${2:-400}
limit=${3:-560}
out=${OUT:-bench/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1

left() { echo $((limit - SECONDS)); }

python3 bench/gpu_medgemma.py --commit "$commit" --budget-s "$budget" --no-record \
  --json "$out/gpu_medgemma.json" 2>&1 | tee "$out/gpu_medgemma.log"
if [ "$(left)" -gt 100 ]; then  # the profile builds the model again: about a minute
  timeout $(($(left) - 30)) python3 bench/gpu_decode_profile.py 2>&1 | tee "$out/gpu_decode_profile.log"
fi
if [ "$(left)" -gt 40 ]; then
  timeout $(($(left) - 10)) python3 bench/pixels.py --no-record 2>&1 | tee "$out/pixels.log"
fi
echo "done with $(left) s of the call left"
