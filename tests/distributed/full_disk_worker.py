"""torchrun worker: ``rasa-train`` with rank 0's checkpoint writes failing with ENOSPC once they pass
``RASA_TEST_FAIL_AFTER_BYTES`` bytes (a disk that fills during the second checkpoint).

    torchrun --nproc_per_node 2 full_disk_worker.py --config RECIPE
"""
import errno
import os
import sys

from rasa_megatron.cli.train import main
from rasa_megatron.training import state_io

LIMIT = int(os.environ["RASA_TEST_FAIL_AFTER_BYTES"])
_written = 0
_original = state_io._write


def _filling_disk(handle, data):
    global _written
    if os.environ.get("RANK", "0") == "0":
        if _written + len(data) > LIMIT:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _written += len(data)
    _original(handle, data)


state_io._write = _filling_disk

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
