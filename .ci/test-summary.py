#!/usr/bin/env python3
"""How many tests ran and how many skipped, from `cargo test`'s log and the skip log.

usage: test-summary.py CARGO_TEST_LOG SKIP_LOG REQUIRE_ALL(0|1)

libtest counts a skipped test as passed (it returned early), so the skips are taken out of the
passed count. Exits 1 when a skip happened though every test had to run, or when the log holds
no test result at all (cargo test did not get to run anything).
"""
import re
import sys


def main(log_path, skip_path, require_all):
    passed = failed = ignored = binaries = 0
    pattern = re.compile(r"^test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored;")
    with open(log_path, errors="replace") as log:
        for line in log:
            m = pattern.match(line)
            if m:
                binaries += 1
                passed += int(m.group(1))
                failed += int(m.group(2))
                ignored += int(m.group(3))
    try:
        with open(skip_path, errors="replace") as f:
            skips = [l.rstrip("\n") for l in f if l.startswith("SKIPPED:")]
    except FileNotFoundError:
        skips = []
    ran = passed + failed - len(skips)
    print(f"{ran} tests ran, {len(skips)} skipped ({failed} failed, {ignored} ignored, {binaries} test binaries)")
    for s in skips:
        print(f"  {s}")
    if binaries == 0:
        print(f"no `test result:` line in {log_path}: no test ran", file=sys.stderr)
        return 1
    if skips and require_all:
        print(f"{len(skips)} test(s) skipped where every test must run (VMQ_REQUIRE_ALL=1)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[3] not in ("0", "1"):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3] == "1"))
