"""``python -m mmfast``: which backends run here, why the others do not, and the CPU code paths."""

from __future__ import annotations

import sys

from mmfast.ops import backends


def main() -> int:
    sys.stdout.write(str(backends(pretty=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
