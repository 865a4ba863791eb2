"""One of the processes of tests/test_paged.py's multi-process check: the embedded model on a mesh
that spans every process (jax.distributed on 127.0.0.1), paged decode against contiguous decode
(paged_util.paged_equals_contiguous, both on that mesh). Process 0 writes the logits it saw to OUT
(.npz, read back without pickle) for the test to compare with one process's.

    python tests/paged_two_processes.py OUT --mesh M [--rules R] --coordinator-address 127.0.0.1:P \
        --num-processes 2 --process-id I --num-cpu-devices 4
"""

from __future__ import annotations

import argparse

import numpy as np

from kimi_jax.runtime import distributed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--mesh", required=True)
    parser.add_argument("--rules", default=None)
    distributed.add_arguments(parser)
    args = parser.parse_args()
    info = distributed.initialize(args)

    from jax.experimental import multihost_utils
    from paged_util import paged_equals_contiguous

    from kimi_jax.runtime.default_model import load_default

    model = load_default(mesh=args.mesh, rules=args.rules)  # float32
    seen = paged_equals_contiguous(model, host=lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)))
    if info.is_main:
        np.savez(args.out, **seen)


if __name__ == "__main__":
    main()
