"""Sum the property tests' example tallies (tests/strategies.py writes one JSON file per process
into the folder MMFAST_HYPOTHESIS_TALLY) into a table: examples tried and passed per test.

    MMFAST_HYPOTHESIS_PROFILE=long MMFAST_HYPOTHESIS_TALLY=build/tally python -m pytest tests/test_properties_*.py
    python tools/hypothesis_tally.py build/tally
"""

from __future__ import annotations

import glob
import json
import os
import sys


def main(folder: str) -> None:
    total: dict[str, list[int]] = {}
    for path in glob.glob(os.path.join(folder, "tally-*.json")):
        with open(path) as f:
            for key, (tried, passed) in json.load(f).items():
                t = total.setdefault(key, [0, 0])
                t[0] += tried
                t[1] += passed
    print("| test [backend] | tried | passed |")
    print("|---|---:|---:|")
    for key in sorted(total):
        print(f"| {key} | {total[key][0]} | {total[key][1]} |")
    print(f"| **all** | {sum(t[0] for t in total.values())} | {sum(t[1] for t in total.values())} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "build/tally")
