"""`python -m kimi_jax.convert --hf HF_DIR --out OUT_DIR`: a Hugging Face checkpoint -> kimi_jax's orbax format.

The conversion itself is `kimi_jax.checkpoint.convert.convert`; this module is its command line.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from kimi_jax.checkpoint.convert import convert
from kimi_jax.runtime import flags


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kimi_jax.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", required=True, metavar="HF_DIR", type=flags.directory("Hugging Face checkpoint directory"),
                   help="Hugging Face checkpoint directory")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="where to write the orbax checkpoint")
    p.add_argument("--quantize", choices=("keep", "fp8"), default="keep",
                   help="keep the source's dtypes (default), or quantize a bf16 checkpoint to block-fp8")
    p.add_argument("--mesh", metavar="SPEC", help="check the model splits over this mesh, e.g. 'expert=8,tensor=4'")
    p.add_argument("--force", action="store_true", help="replace an existing converted checkpoint at OUT_DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax notes each item has no OCDBT part to merge
    start = time.perf_counter()
    try:
        out = convert(args.hf, args.out, args.quantize, args.mesh, args.force, progress=not args.no_progress)
    except (OSError, ValueError) as e:  # CheckpointError, ConfigError, SafetensorsError, MeshError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written to the output", file=sys.stderr)
        return 130
    print(f"[convert] wrote {out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
