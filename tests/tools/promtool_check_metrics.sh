#!/bin/sh
# Runs COMMAND, feeds its stdout to `promtool check metrics`, and passes only when promtool
# accepts it silently: some promtool versions exit 0 while printing lint problems, so any
# output from promtool counts as a complaint.
#
#   promtool_check_metrics.sh [--expect-fail] -- COMMAND [ARGS...]
#
# --expect-fail inverts the verdict (for negative tests on known-bad input). Exit 77 (ctest
# SKIP_RETURN_CODE) when promtool is not installed; PROMTOOL overrides its path.
set -u

expect_fail=0
if [ "${1:-}" = "--expect-fail" ]; then expect_fail=1; shift; fi
if [ "${1:-}" != "--" ] || [ "$#" -lt 2 ]; then
  echo "usage: $0 [--expect-fail] -- COMMAND [ARGS...]" >&2
  exit 2
fi
shift

promtool="${PROMTOOL:-$(command -v promtool || true)}"
if [ -z "$promtool" ] || [ ! -x "$promtool" ]; then
  echo "SKIP: promtool not found (Debian package 'prometheus')" >&2
  exit 77
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

if ! "$@" >"$tmp/metrics.txt"; then
  echo "FAIL: generator exited non-zero: $*" >&2
  exit 1
fi
if [ ! -s "$tmp/metrics.txt" ]; then
  # promtool accepts empty input, so an empty file would pass for the wrong reason.
  echo "FAIL: generator wrote nothing: $*" >&2
  exit 1
fi

"$promtool" check metrics <"$tmp/metrics.txt" >"$tmp/promtool.out" 2>&1
rc=$?
complaints="$(cat "$tmp/promtool.out")"

if [ "$rc" -eq 0 ] && [ -z "$complaints" ]; then
  verdict=accepted
else
  verdict=rejected
fi

if [ "$expect_fail" -eq 1 ]; then
  if [ "$verdict" = rejected ]; then
    echo "OK: promtool rejected the input as expected (exit $rc): $complaints"
    exit 0
  fi
  echo "FAIL: promtool accepted input that should have been rejected:" >&2
  cat "$tmp/metrics.txt" >&2
  exit 1
fi

if [ "$verdict" = accepted ]; then
  echo "OK: promtool accepted $(wc -l <"$tmp/metrics.txt") lines"
  exit 0
fi
echo "FAIL: promtool check metrics exited $rc and said:" >&2
echo "$complaints" >&2
echo "--- input ---" >&2
cat "$tmp/metrics.txt" >&2
exit 1
