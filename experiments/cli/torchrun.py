"""``pqa run --nproc N``'s launcher: torchrun (``torch.distributed.run``), with a failed process said in one line.

torchrun prints a 40-line report (its ``ChildFailedError``) when a process fails or dies. Here the
failure is one ``Error:`` line naming the process and its own error line (left in ``$PQA_WORKER_ERRORS``,
``pqa_core.training.distributed``), or the signal that killed it; when the main process (rank 0) has
said why in its own line (it left that line too), nothing is added.
"""
from __future__ import annotations

import logging
import os
import sys


def main(argv=None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from pqa_core.training.distributed import ERRORS_ENV

    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)  # its warnings: what follows says it
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        folder = os.environ.get(ERRORS_ENV)
        if _error_line(folder, 0):
            return 1  # the main process said why (a failed process's line included), in its own line
        line = _error_line(folder, rank)
        if failure.exitcode < 0 or not line:
            how = f"was killed ({failure.signal_name()})" if failure.exitcode < 0 else f"exited {failure.exitcode}"
            line = f"training process {rank} {how}"
        else:
            line = f"training process {rank} failed: {line}"
        print(f"Error: {line}; the other processes were stopped", file=sys.stderr, flush=True)
        return 1
    return 0


def _error_line(folder, rank) -> str:
    if not folder:
        return ""
    try:
        with open(os.path.join(folder, f"rank-{rank}.txt")) as f:
            return f.read().strip()
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
