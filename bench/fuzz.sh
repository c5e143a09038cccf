#!/usr/bin/env bash
# Runs cargo-fuzz targets for N seconds each and prints, per target, libFuzzer's executions and
# coverage (its final "#N DONE cov: X ft: Y" line).
#
#   bench/fuzz.sh TARGET... [--seconds N] [--asan]
#   bench/fuzz.sh --all --seconds 600
#
# Default: stable toolchain, --sanitizer none (cargo-fuzz works on stable that way). --asan uses
# the nightly toolchain with AddressSanitizer, if one is installed. New corpus entries go to
# fuzz/corpus/<target>/ (ignored by git, except the seeds); crashes to fuzz/artifacts/<target>/.
set -euo pipefail

cd "$(dirname "$0")/../fuzz"
seconds=60
asan=0
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds="$2"; shift 2 ;;
        --asan) asan=1; shift ;;
        --all) mapfile -t targets < <(cargo fuzz list); shift ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) targets+=("$1"); shift ;;
    esac
done
[ ${#targets[@]} -gt 0 ] || { echo "usage: bench/fuzz.sh TARGET... [--seconds N] [--asan] (targets: $(cargo fuzz list | tr '\n' ' '))" >&2; exit 2; }
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz missing: cargo install cargo-fuzz --locked" >&2; exit 2; }

if [ "$asan" = 1 ]; then
    rustup toolchain list | grep -q '^nightly' || { echo "--asan needs a nightly toolchain" >&2; exit 2; }
    toolchain=+nightly
    sanitizer=address
else
    toolchain=+stable
    sanitizer=none
fi

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
status=0
printf '%-16s %8s %12s %10s %8s %8s %s\n' target seconds execs execs/s cov ft result
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    log="$logs/$t.log"
    result=ok
    cargo $toolchain fuzz run --sanitizer "$sanitizer" "$t" "corpus/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1 || { result=FAILED; status=1; }
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true)
    execs=$(sed -nE 's/^stat::number_of_executed_units:[[:space:]]*([0-9]+).*/\1/p' "$log" | tail -1)
    rate=$(sed -nE 's/^stat::average_exec_per_sec:[[:space:]]*([0-9]+).*/\1/p' "$log" | tail -1)
    cov=$(sed -nE 's/.*cov: ([0-9]+).*/\1/p' <<<"$done_line")
    ft=$(sed -nE 's/.*ft: ([0-9]+).*/\1/p' <<<"$done_line")
    printf '%-16s %8s %12s %10s %8s %8s %s\n' "$t" "$seconds" "${execs:--}" "${rate:--}" "${cov:--}" "${ft:--}" "$result"
    if [ "$result" != ok ]; then
        echo "--- $t: last lines of the log (crash input in fuzz/artifacts/$t/) ---" >&2
        tail -40 "$log" >&2
    fi
done
exit $status
