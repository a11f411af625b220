"""``python -m uamt_fast.data pack | synth | prepare``: the data commands.

The only module that imports the commands' modules (``packing``, ``synthetic`` and ``prepare``, which reads
sources into the layout), so none of them imports another's command line.
"""
from __future__ import annotations

import argparse
import sys

from uamt_fast import cli
from uamt_fast.data import prepare
from uamt_fast.data.layout import DataError, check_case_id
from uamt_fast.data.packing import pack_dataset, split_into_parts
from uamt_fast.data.synthetic import write_synthetic_la

DESCRIPTION = "Left atrium (LA) MRI data: the UA-MT release layout, a lossless packed copy, synthetic scans, " \
    "any MSD / nnU-Net / NIfTI folder prepared into that layout."


class _Parser(cli.OneLineParser):
    error_type = DataError


def main(argv=None) -> int:
    usage = ("examples:\n"
             "  python -m uamt_fast.data pack /path/to/LA benchmarks/la_pack --train 16 --unlabeled 24 --test 4\n"
             "  python -m uamt_fast.data pack /path/to/LA LA_parts --train 80 --test 20 --max-part-mib 60\n"
             "  python -m uamt_fast.data synth demo_data --train 12 --test 4 --shape 48 48 32 --seed 0\n"
             "  python -m uamt_fast.data prepare Task02_Heart prepared_heart --preset none --test-count 4")
    fmt = {"formatter_class": argparse.RawDescriptionHelpFormatter, "epilog": usage}
    parser = _Parser(prog="python -m uamt_fast.data", description=DESCRIPTION, **fmt)
    commands = parser.add_subparsers(dest="command", required=True)
    pack = commands.add_parser("pack", help="write a compact lossless copy of some LA cases",
                               description="Write a compact lossless copy (uint8 codes + a value table per scan) of "
                               "some LA cases, in the release layout.", **fmt)
    pack.add_argument("root", help="LA root (holds train.list, test.list and the h5 files)")
    pack.add_argument("out", help="output root (same layout, packed .npz files); not the source root")
    pick = pack.add_mutually_exclusive_group(required=True)
    pick.add_argument("--cases", nargs="+", metavar="ID",
                      help="these ids, plain names listed in train.list or test.list (each stays in its own list)")
    pick.add_argument("--train", type=cli.number(int, ">= 0"), metavar="N",
                      help="the first N >= 0 ids of train.list (the labeled ones)")
    pack.add_argument("--unlabeled", type=cli.number(int, ">= 0"), default=0, metavar="K",
                      help="with --train: the next K >= 0 ids of train.list (default: 0)")
    pack.add_argument("--test", type=cli.number(int, ">= 0"), default=0, metavar="M",
                      help="with --train: the first M >= 0 ids of test.list (default: 0); N + K + M >= 1, "
                      "N + K at most the train ids, M at most the test ids")
    pack.add_argument("--max-part-mib", type=cli.number(float, "> 0"), metavar="MIB",
                      help="split the output into out/part1, out/part2, ... of at most MIB MiB each (a finite "
                      "number > 0, at least the largest packed case); every part holds the full lists, train with "
                      "--data on every part (default: one folder)")
    synth = commands.add_parser("synth", help="write a synthetic LA-like data set",
                                description="Write a synthetic LA-like data set (blobs in noise) in the release "
                                "layout, for the demo and tests.", **fmt)
    synth.add_argument("out", help="output root (train.list, test.list and h5 files)")
    synth.add_argument("--train", type=cli.number(int, ">= 1"), default=8, metavar="N",
                       help="training cases, >= 1 (default: 8)")
    synth.add_argument("--test", type=cli.number(int, ">= 1"), default=2, metavar="M", help="test cases, >= 1 (default: 2)")
    synth.add_argument("--shape", type=cli.number(int, ">= 1"), nargs=3, default=(128, 128, 96), metavar=("X", "Y", "Z"),
                       help="volume shape, each >= 1 (default: 128 128 96)")
    synth.add_argument("--seed", type=cli.number(int, ">= 0"), default=0, metavar="S",
                       help="random seed >= 0: the same seed writes the same data (default: 0)")
    prepare.add_command(commands, fmt)
    try:
        args = parser.parse_args(argv)
        if args.command == "prepare":
            return prepare.run(args)
        if args.command == "synth":
            root = write_synthetic_la(args.out, args.train, args.test, tuple(args.shape), args.seed)
            print(f"wrote {args.train} train + {args.test} test synthetic cases of shape {tuple(args.shape)} to {root}")
            return 0
        if args.cases and (args.unlabeled or args.test):
            raise DataError("--cases cannot be combined with --unlabeled / --test")
        for case_id in args.cases or []:
            check_case_id(case_id, "--cases")
        report = pack_dataset(args.root, args.out, args.cases, args.train, args.test, args.unlabeled)
        parts = split_into_parts(args.out, report, int(args.max_part_mib * 2**20)) if args.max_part_mib else []
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = sum(size for _, size, _ in report) / 2**20
    for case_id, size, _ in report:
        print(f"{case_id}  {size / 2**20:6.3f} MiB")
    print(f"{len(report)} cases, {total:.2f} MiB ({total / len(report):.3f} MiB a case). Lossless: every case was "
          "read back and its image and label are bit-identical to the source's.")
    for folder, ids, size in parts:  # (only with --max-part-mib)
        print(f"{folder}: {len(ids)} cases, {size / 2**20:.2f} MiB")
    if parts:
        print("train on all parts together: " + " ".join(f"--data {folder}" for folder, _, _ in parts))
    return 0


def prepare_main(argv=None) -> int:
    """The ``uamt_fast_prepare`` command: ``python -m uamt_fast.data prepare`` under nnU-Net's style of name."""
    return main(["prepare", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
