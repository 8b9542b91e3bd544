"""The ``fasterrcnn`` command line: one subcommand per task.

To add a subcommand, write ``_add_<name>(parser)`` (its arguments) and ``_run_<name>(args) -> int``
(its work, returning the exit code) and list them in ``SUBCOMMANDS``. Bad input raises
``fasterrcnn.data.DataError`` (or an ``OSError``) with a message; ``main`` prints
``error: <message>`` to stderr and exits with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _image_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 256x320, got {text!r}") from None
    return h, w


# ---- synth --------------------------------------------------------------------------------------


def _add_synth(p: argparse.ArgumentParser) -> None:
    from fasterrcnn.data.synth import DEFAULT_CLASSES, SHAPES

    p.add_argument("--out", required=True, help="output directory (reused if made with the same options)")
    p.add_argument("--num-train", type=int, default=200, help="training images (default 200)")
    p.add_argument("--num-val", type=int, default=50, help="validation images (default 50)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", type=_image_size, default=(256, 320), metavar="HxW",
                   help="image size, height x width (default 256x320)")
    p.add_argument("--classes", default=",".join(DEFAULT_CLASSES),
                   help=f"comma-separated shapes from {','.join(SHAPES)} (default {','.join(DEFAULT_CLASSES)})")
    p.add_argument("--min-object-size", type=int, default=12, help="smallest object, pixels (default 12)")
    p.add_argument("--max-object-size", type=int, default=None,
                   help="largest object, pixels (default half the short side)")
    p.add_argument("--max-objects", type=int, default=6, help="most objects per image (default 6)")
    p.add_argument("--empty-fraction", type=float, default=0.1,
                   help="fraction of images without objects (default 0.1)")
    p.add_argument("--format", choices=("jpg", "png"), default="jpg", help="image format (default jpg)")
    p.add_argument("--voc", action="store_true", help="also write a Pascal VOC layout under OUT/VOC")
    p.add_argument("--workers", type=int, default=None, help="drawing processes (default: CPUs, up to 8)")


def _run_synth(args: argparse.Namespace) -> int:
    import time

    from fasterrcnn.data.synth import generate

    start = time.perf_counter()
    paths = generate(args.out, num_train=args.num_train, num_val=args.num_val, seed=args.seed,
                     image_size=args.size, classes=[c.strip() for c in args.classes.split(",") if c.strip()],
                     voc=args.voc, min_object_size=args.min_object_size,
                     max_object_size=args.max_object_size, max_objects=args.max_objects,
                     empty_fraction=args.empty_fraction, image_format=args.format, workers=args.workers)
    print(f"synthetic dataset in {paths.root} ({time.perf_counter() - start:.1f} s)")
    print(f"  train: {paths.train_json}  images: {paths.train_images}")
    print(f"  val:   {paths.val_json}  images: {paths.val_images}")
    if paths.voc_root is not None:
        print(f"  VOC:   {paths.voc_root}")
    return 0


# ---- check-data ---------------------------------------------------------------------------------


def _add_check_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a COCO instances json, or a Pascal VOC root")
    p.add_argument("--images", default=None, help="COCO image folder (default: guessed from the json's place)")
    p.add_argument("--split", default=None, help="VOC split (default: trainval, train, val or test, first found)")
    p.add_argument("--classes", default=None,
                   help="VOC class names, comma-separated (default: the 20 VOC classes, or those found)")


def _run_check_data(args: argparse.Namespace) -> int:
    from fasterrcnn.data.check import check_dataset

    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    check = check_dataset(args.path, image_root=args.images, voc_split=args.split, classes=classes)
    print(check)
    return 0 if check.ok else 1


SUBCOMMANDS: list[Subcommand] = [
    Subcommand("synth", "write the synthetic shapes dataset (COCO json, optionally VOC)", _add_synth, _run_synth),
    Subcommand("check-data", "check a COCO json or VOC root: counts, box sizes, problems "
               "(exit 0: clean, 1: problems listed, 2: unusable)", _add_check_data, _run_check_data),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fasterrcnn", description="Faster R-CNN from scratch on PyTorch")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for cmd in SUBCOMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fasterrcnn.data.report import DataError

    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except BrokenPipeError:  # output piped into e.g. `head`, which has closed: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (DataError, OSError) as e:  # bad input: the message names the file, record and field
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
