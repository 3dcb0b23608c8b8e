"""Cut the small real-MNIST sample shipped in the package (used offline and by data=sample).

    python scripts/make_sample.py --source ../shared/data/mnist.npz

Takes the first --train training and --test test images, so the sample is a prefix of MNIST
and reproducible from the full file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "pipeline" / "sample" / "mnist_sample.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="a Keras-layout mnist.npz")
    parser.add_argument("--train", type=int, default=9000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    with np.load(args.source) as full:
        np.savez_compressed(
            args.out,
            x_train=full["x_train"][: args.train],
            y_train=full["y_train"][: args.train],
            x_test=full["x_test"][: args.test],
            y_test=full["y_test"][: args.test],
        )
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
