#!/usr/bin/env bash
# Export one bundle per target, verify each, and fail when a gate fails. The example workflow
# (github-workflow.yml) runs exactly this script; tests/test_ci_example.py runs it too, on a tiny pipeline.
#
# Environment (all optional):
#   MODEL      diffusers pipeline dir (empty: the demo pipeline shipped with tinyprune)
#   TARGETS    space-separated device profiles, default "jetson jetson-xavier-nx"
#   SPARSITY   default 0.43
#   PATTERN    default auto: 2:4 where the target has sparse tensor cores (Orin), else unstructured (Xavier)
#   OUT        where the bundles go, default bundles (one dir per target, plus TARGET.json results)
#   TINYPRUNE  the command, default tinyprune
#   EXTRA      more export options, e.g. "--image-checks 2 --image-steps 10" for a big model on a CPU runner
#
# Exit status: 0 all bundles exported, within their gates and verified; otherwise the first failure's code
# (1 a gate or verify failed: the bundle is still written for upload; 2 bad input; 3 missing backend).
set -uo pipefail

TARGETS=${TARGETS:-"jetson jetson-xavier-nx"}
SPARSITY=${SPARSITY:-0.43}
PATTERN=${PATTERN:-auto}
OUT=${OUT:-bundles}
TINYPRUNE=${TINYPRUNE:-tinyprune}
MODEL=${MODEL:-}
EXTRA=${EXTRA:-}

mkdir -p "$OUT"
status=0
for target in $TARGETS; do
  model_args=()
  if [ -n "$MODEL" ]; then model_args=(--model "$MODEL"); fi
  # shellcheck disable=SC2086  # TINYPRUNE and EXTRA are word lists on purpose
  $TINYPRUNE export "${model_args[@]}" --sparsity "$SPARSITY" --pattern "$PATTERN" --target "$target" \
    --out "$OUT/$target" --force --json $EXTRA > "$OUT/$target.json"
  code=$?
  if [ -d "$OUT/$target" ]; then
    $TINYPRUNE verify "$OUT/$target" || { [ "$code" -eq 0 ] && code=1; }
  fi
  echo "tinyprune-ci: $target: exit $code"
  if [ "$status" -eq 0 ] && [ "$code" -ne 0 ]; then status=$code; fi
done
exit "$status"
