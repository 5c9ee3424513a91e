"""``python -m mmfast.train [--out DIR] [...]`` and ``python -m mmfast.train eval --checkpoint FILE``.

Under a launcher (torchrun, SLURM: world size > 1) the run ends through ``finish_process``: the
process group is torn down and the process exits with ``os._exit``, so no gloo worker thread can
meet a finalizing interpreter (``mmfast.train.distributed.exit_process`` says why that aborts).
"""

from mmfast.train.cli import main
from mmfast.train.distributed import finish_process, launcher_world_size

if __name__ == "__main__":
    if launcher_world_size() > 1:
        finish_process(main)
    main()
