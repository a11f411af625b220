"""Train UA-MT (Yu et al., MICCAI 2019) on the left atrium MRI data set, fast, and evaluate it.

The trainer is ``uamt_fast/train.py`` (``python -m uamt_fast.train``, or the ``uamt-train`` command after
``pip install``); this file runs it from a clone: ``python train.py --demo``, ``python train.py --help``.
"""
import sys

from uamt_fast.train import main

if __name__ == "__main__":
    sys.exit(main())
