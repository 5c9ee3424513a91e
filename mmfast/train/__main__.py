"""``python -m mmfast.train [--out DIR] [...]`` and ``python -m mmfast.train eval --checkpoint FILE``."""

from mmfast.train.cli import main

if __name__ == "__main__":
    main()
