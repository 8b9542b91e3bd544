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
from collections.abc import Callable
from dataclasses import dataclass


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
    p.add_argument(
        "--size",
        type=_image_size,
        default=(256, 320),
        metavar="HxW",
        help="image size, height x width (default 256x320)",
    )
    p.add_argument(
        "--classes",
        default=",".join(DEFAULT_CLASSES),
        help=f"comma-separated shapes from {','.join(SHAPES)} (default {','.join(DEFAULT_CLASSES)})",
    )
    p.add_argument("--min-object-size", type=int, default=12, help="smallest object, pixels (default 12)")
    p.add_argument(
        "--max-object-size", type=int, default=None, help="largest object, pixels (default half the short side)"
    )
    p.add_argument("--max-objects", type=int, default=6, help="most objects per image (default 6)")
    p.add_argument("--empty-fraction", type=float, default=0.1, help="fraction of images without objects (default 0.1)")
    p.add_argument("--format", choices=("jpg", "png"), default="jpg", help="image format (default jpg)")
    p.add_argument("--voc", action="store_true", help="also write a Pascal VOC layout under OUT/VOC")
    p.add_argument("--workers", type=int, default=None, help="drawing processes (default: CPUs, up to 8)")


def _run_synth(args: argparse.Namespace) -> int:
    import time

    from fasterrcnn.data.synth import generate

    start = time.perf_counter()
    paths = generate(
        args.out,
        num_train=args.num_train,
        num_val=args.num_val,
        seed=args.seed,
        image_size=args.size,
        classes=[c.strip() for c in args.classes.split(",") if c.strip()],
        voc=args.voc,
        min_object_size=args.min_object_size,
        max_object_size=args.max_object_size,
        max_objects=args.max_objects,
        empty_fraction=args.empty_fraction,
        image_format=args.format,
        workers=args.workers,
    )
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
    p.add_argument(
        "--classes", default=None, help="VOC class names, comma-separated (default: the 20 VOC classes, or those found)"
    )


def _run_check_data(args: argparse.Namespace) -> int:
    from fasterrcnn.data.check_data import check_dataset

    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    check = check_dataset(args.path, image_root=args.images, voc_split=args.split, classes=classes)
    print(check)
    return 0 if check.ok else 1


# ---- train ------------------------------------------------------------------------------------

ARCH_HELP = (
    "builder for torchvision-format weights: fasterrcnn_resnet50_fpn (default), fasterrcnn_resnet50_fpn_v2, "
    "fasterrcnn_mobilenet_v3_large_fpn, fasterrcnn_mobilenet_v3_large_320_fpn, or any other builder name; "
    "with --weights DEFAULT (or COCO_V1), torchvision's published COCO weights for it (downloaded once)"
)
DEMO_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "demo.yaml")


def _setup_logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="SECTION.KEY=VALUE",
        help="config overrides, e.g. solver.lr=0.01 train.iterations=2000 data.train=ann.json",
    )
    p.add_argument(
        "--config", default=None, help="a YAML config (default: the built-in CPU demo recipe, configs/demo.yaml)"
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="CKPT",
        help="continue the run of this last.pt exactly as it was configured (overrides: only "
        "data.workers, train.threads, train.device, train.log_every, and the validation set: "
        "data.val, data.val_images)",
    )


def _run_train(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from fasterrcnn.engine import distributed as dist
    from fasterrcnn.engine.config import ConfigError, load_config
    from fasterrcnn.engine.signals import TrainingInterrupted
    from fasterrcnn.experiments.schedules import train_schedule

    _setup_logging()
    if args.resume and args.config:
        raise ConfigError(
            f"--resume {args.resume} continues the run with the config saved in the checkpoint; "
            f"drop --config {args.config}"
        )
    # with --resume the checkpoint's config is used; the overrides go to train(), which allows a few
    cfg = None if args.resume else load_config(args.config or DEMO_CONFIG, overrides=args.overrides)
    try:
        with logging_redirect_tqdm():  # log lines go above a progress bar, not into it
            result = train_schedule(cfg, resume=args.resume, resume_overrides=args.overrides if args.resume else ())
    except TrainingInterrupted as stop:  # SIGINT/SIGTERM: last.pt saved; 128 + the signal, as a shell reports
        if dist.is_main():
            print(f"stopped: {stop}", file=sys.stderr)
        return stop.exit_code
    finally:
        dist.cleanup()
    if dist.is_main() and result.evaluation is not None:
        print(result.evaluation.format_table())
        pictures = ["losses.png", "ap.png", "precision_recall.png", "confusion_matrix.png", "f1_curve.png"]
        pictures.append("val_predictions.jpg")
        print(
            f"\nrun folder: {result.run_dir} ({result.seconds:.0f} s); plots: "
            + ", ".join(str(result.run_dir / n) for n in pictures if (result.run_dir / n).exists())
        )
    return 0


# ---- evaluate -----------------------------------------------------------------------------------


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True, help="a training checkpoint (last.pt/best.pt) or torchvision weights")
    p.add_argument("--data", required=True, help="a COCO instances json or a Pascal VOC root")
    p.add_argument("--images", default=None, help="COCO image folder (default: next to the json)")
    p.add_argument("--split", default="val", help="VOC split (default: val)")
    p.add_argument("--classes", default=None, help="VOC class names, comma-separated (default: the checkpoint's)")
    p.add_argument("--arch", default="fasterrcnn_resnet50_fpn", help=ARCH_HELP)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--amp",
        choices=("none", "bf16", "fp16"),
        default="none",
        help="bf16/fp16: the network in that dtype (boxes, scores and NMS stay float32)",
    )
    p.add_argument(
        "--no-optimize",
        dest="optimize",
        action="store_false",
        help="run the model as trained (autocast for --amp) instead of the optimised inference copy "
        "(BatchNorm folded, channels-last)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="folder for eval.json, voc.json, predictions.json and the error analysis: confusion_matrix.png/.csv, "
        "f1_curve.png, val_predictions.jpg",
    )
    p.add_argument(
        "--score-threshold",
        type=_fraction,
        default=0.5,
        help="the confusion matrix and the error grid count detections scoring at least this (default 0.5; "
        "the metrics use every detection)",
    )
    p.add_argument(
        "--iou-threshold",
        type=_fraction,
        default=0.5,
        help="a detection matches an object at this IoU or more, in the confusion matrix and F1 (default 0.5)",
    )
    _add_tta(p)
    _add_backend(p)


def _run_evaluate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path
    from typing import cast

    import torch

    from fasterrcnn.engine.config import ConfigError
    from fasterrcnn.engine.diagnostics import write_diagnostics
    from fasterrcnn.engine.evaluator import evaluate_model, match_categories_by_name
    from fasterrcnn.engine.setup import data_format, open_dataset, resolve_device
    from fasterrcnn.files import atomic_write_text
    from fasterrcnn.inference.detector import load_weights

    _setup_logging()
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device)
    if args.amp == "fp16" and device.type != "cuda":
        raise ConfigError(f"--amp fp16 needs a CUDA device, and this runs on {device.type}; use --amp bf16 or none")
    loaded, class_names, label_to_cat_id, exported = load_weights(
        args.weights,
        backend=args.backend,
        arch=args.arch,
        device=args.device,
        threads=args.threads,
        bf16=args.amp == "bf16",
    )
    model = cast("torch.nn.Module", loaded)  # an exported file is called like the eager model
    amp, optimize = args.amp, args.optimize
    if exported:  # it carries its class names and runs on the CPU as it was exported (bf16: the runtime's)
        device, amp, optimize = torch.device("cpu"), "none", False
    if args.tta and exported:
        raise ConfigError("--tta runs a checkpoint's eager model; an exported file runs without it")
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else class_names[1:]
    dataset = open_dataset(args.data, args.images or "", "auto", args.split, classes)
    if len(dataset.report):  # skipped or fixed images and boxes: counted, and check-data lists them
        print(f"note: {dataset.report.summary()} (fasterrcnn check-data {args.data} lists them)")
    is_coco = data_format(args.data) == "coco"  # the model's labels meet the data's through the category ids
    if is_coco:  # matched by name, before any inference: a DataError when the names differ
        label_to_cat_id, notes = match_categories_by_name(
            class_names,
            label_to_cat_id,
            dataset.class_names,
            dataset.label_to_cat_id,
            data_source=args.data,
            model_source=args.weights,
        )
        for note in notes:
            print(f"note: {note}")
    out = _output_folder(args.out, "--out") if args.out else None
    result = evaluate_model(
        model,
        dataset,
        class_names=class_names,
        label_to_cat_id=label_to_cat_id,
        ann_file=args.data if is_coco else None,
        batch_size=args.batch_size,
        device=device,
        amp=amp,
        results_path=out / "predictions.json" if out else None,
        optimize=optimize,
        tta=cast(dict, _tta_options(args)) if args.tta else None,  # around the optimised copy
    )
    if result.coco.message:
        print(f"note: {result.coco.message}")
    print(result.format_table())
    if out:
        result.coco.to_json(out / "eval.json")
        result.voc.to_json(out / "voc.json")
        atomic_write_text(out / "summary.json", json.dumps(result.summary(), indent=2))
        found = write_diagnostics(
            result,
            dataset,
            class_names=class_names,
            label_to_cat_id=label_to_cat_id,
            out_dir=out,
            score_threshold=args.score_threshold,
            iou_threshold=args.iou_threshold,
            title=Path(args.weights).name,
        )
        print(
            f"best F1 {found.f1.best_f1:.3f} at score {found.f1.best_threshold:.2f} "
            f"(the --score-threshold for predict; f1_curve.png)"
        )
        print(f"\nwritten: {out / 'eval.json'}, {out / 'voc.json'}, {out / 'predictions.json'}")
        print("error analysis: " + ", ".join(str(p) for k, p in found.paths.items()))
    return 0


# ---- export -------------------------------------------------------------------------------------


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        required=True,
        help="a training checkpoint (last.pt/best.pt) or torchvision detector weights; a path, a URL or a "
        "published name with --arch",
    )
    p.add_argument("--arch", default="fasterrcnn_resnet50_fpn", help=ARCH_HELP)
    p.add_argument(
        "--format",
        choices=["onnx", "openvino", "torchscript"],
        default="onnx",
        help="onnx (ONNX Runtime and others), openvino (IR: FILE.xml + FILE.bin) or torchscript (torch.jit.load, "
        "LibTorch) (default onnx)",
    )
    p.add_argument("--out", required=True, help="the file to write (.onnx, .xml, .torchscript)")
    p.add_argument(
        "--input-dtype",
        choices=["uint8", "float32"],
        default="uint8",
        help="the pixels the file takes: uint8 0..255 (default) or float32 0..1",
    )
    p.add_argument(
        "--score-threshold",
        type=_fraction,
        default=None,
        help="the model's box score threshold inside the file (default: the model's own, 0.05)",
    )
    p.add_argument(
        "--example-size",
        type=_image_size,
        default=(480, 640),
        metavar="HxW",
        help="the image size traced (any size runs; default 480x640)",
    )


def _run_export(args: argparse.Namespace) -> int:
    import time

    from fasterrcnn.deploy import export
    from fasterrcnn.engine.setup import load_model_for_inference

    _setup_logging()
    start = time.perf_counter()
    model, names, label_to_cat_id = load_model_for_inference(args.weights, arch=args.arch, device="cpu")
    path = export(
        model,
        args.out,
        format=args.format,
        class_names=names,
        label_to_cat_id=label_to_cat_id,
        arch=args.arch,
        input_dtype=args.input_dtype,
        score_threshold=args.score_threshold,
        example_size=args.example_size,
    )
    written = [path] + ([path.with_suffix(".bin")] if args.format == "openvino" else [])
    sizes = ", ".join(f"{p} ({p.stat().st_size / 2**20:.1f} MB)" for p in written)
    print(f"written: {sizes} in {time.perf_counter() - start:.0f} s; {len(names) - 1} classes")
    backend = {"onnx": "onnxruntime", "openvino": "openvino", "torchscript": "torch"}[args.format]
    print(f"run it: fasterrcnn predict IMAGES --weights {path} --backend {backend}")
    return 0


# ---- quantize -----------------------------------------------------------------------------------


def _add_quantize(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True, help="a training checkpoint (best.pt) or torchvision detector weights")
    p.add_argument("--arch", default="fasterrcnn_resnet50_fpn", help=ARCH_HELP)
    p.add_argument("--data", required=True, help="calibration images: a COCO json (training set) or a Pascal VOC root")
    p.add_argument("--images", default=None, help="COCO image folder (default: next to the json)")
    p.add_argument("--split", default="train", help="VOC split (default: train)")
    p.add_argument("--out", required=True, help="the int8 OpenVINO IR to write (.xml; the .bin goes beside it)")
    p.add_argument(
        "--calibration-images",
        type=_int_at_least(1),
        default=300,
        help="how many images calibrate the activation ranges (default 300; evenly spread over the data)",
    )
    p.add_argument("--input-dtype", choices=["uint8", "float32"], default="uint8", help="as for export")
    p.add_argument("--score-threshold", type=_fraction, default=None, help="as for export")


def _run_quantize(args: argparse.Namespace) -> int:
    import time

    from fasterrcnn.deploy.quantize import quantize
    from fasterrcnn.engine.setup import load_model_for_inference, open_dataset

    _setup_logging()
    start = time.perf_counter()
    model, names, label_to_cat_id = load_model_for_inference(args.weights, arch=args.arch, device="cpu")
    dataset = open_dataset(args.data, args.images or "", "auto", args.split, names[1:])
    count = min(args.calibration_images, len(dataset))
    picks = sorted({round(k * len(dataset) / count) for k in range(count)})  # evenly spread, deterministic
    path = quantize(
        model,
        args.out,
        calibration_images=(dataset.load_image(i) for i in picks),
        num_images=count,
        class_names=names,
        label_to_cat_id=label_to_cat_id,
        arch=args.arch,
        input_dtype=args.input_dtype,
        score_threshold=args.score_threshold,
    )
    size = (path.stat().st_size + path.with_suffix(".bin").stat().st_size) / 2**20
    print(
        f"written: {path} and {path.with_suffix('.bin')} ({size:.1f} MB) in {time.perf_counter() - start:.0f} s; "
        f"int8, calibrated on {len(picks)} images of {args.data}"
    )
    print(f"run it: fasterrcnn predict IMAGES --weights {path} --backend openvino")
    return 0


# ---- synth-video --------------------------------------------------------------------------------


def _add_synth_video(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="the video file to write (.mp4)")
    p.add_argument("--frames", type=_int_at_least(1), default=300, help="frames (default 300)")
    p.add_argument("--size", type=_image_size, default=(480, 640), metavar="HxW", help="frame size (default 480x640)")
    p.add_argument("--fps", type=float, default=30.0, help="frames per second (default 30)")
    p.add_argument("--objects", type=_int_at_least(0), default=4, help="moving shapes (default 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _run_synth_video(args: argparse.Namespace) -> int:
    import time

    from fasterrcnn.data.synth_video import write_video

    start = time.perf_counter()
    n = write_video(
        args.out, num_frames=args.frames, image_size=args.size, fps=args.fps, num_objects=args.objects, seed=args.seed
    )
    h, w = args.size
    print(f"{args.out}: {n} frames, {w}x{h} at {args.fps:g} frames/s ({time.perf_counter() - start:.1f} s)")
    return 0


# ---- predict ------------------------------------------------------------------------------------


def _output_folder(path, option: str):
    """Create the folder ``option`` names (a ConfigError naming it, not a raw [Errno ...], when it cannot be)."""
    from pathlib import Path

    from fasterrcnn.engine.config import ConfigError

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(
            f"{option} {folder}: this is a file, and {option} names a folder for the results; "
            "give a new or existing folder"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"{option} {folder}: cannot create this folder ({e.strerror or e}); give a folder you can write to"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {folder}: this folder is not writable; give a folder you can write to")
    return folder


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def _int_at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text}")
        return value

    parse.__name__ = "int"  # argparse names the type in its message for non-numbers
    return parse


def _add_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=["torch", "onnxruntime", "openvino"],
        default="torch",
        help="what runs the model: torch (a checkpoint, or a TorchScript file from `fasterrcnn export`), "
        "onnxruntime (an .onnx file) or openvino (an .xml IR, e.g. from `fasterrcnn quantize`, or an .onnx "
        "file) (default torch)",
    )
    p.add_argument(
        "--threads", type=_int_at_least(1), default=None, help="the runtime's threads (default: its own choice)"
    )


def _add_tta(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("test-time augmentation (a checkpoint, not an exported file)")
    group.add_argument(
        "--tta",
        action="store_true",
        help="run each image at several sizes and mirrored, and merge the detections (slower: one pass each)",
    )
    group.add_argument(
        "--tta-scales",
        type=float,
        nargs="+",
        default=[0.8, 1.0, 1.2],
        metavar="S",
        help="with --tta: the sizes, as multiples of the model's (default 0.8 1.0 1.2)",
    )
    group.add_argument(
        "--tta-merge",
        choices=["nms", "voting"],
        default="nms",
        help="with --tta: class-wise NMS over all passes, or NMS with box voting (default nms)",
    )


def _tta_options(args: argparse.Namespace) -> dict | bool:
    return {"scales": tuple(args.tta_scales), "merge": args.tta_merge} if args.tta else False


def _add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "sources",
        nargs="*",
        metavar="SOURCE",
        help="image and video files, folders and glob patterns ('**' allowed), a camera index (0: the first "
        "camera) or a stream URL (rtsp://, http://, ...)",
    )
    p.add_argument(
        "--source",
        action="append",
        default=[],
        dest="more_sources",
        metavar="SOURCE",
        help="one more source, e.g. --source 0 for the first camera (may be repeated)",
    )
    p.add_argument(
        "--weights",
        required=True,
        help="a training checkpoint (last.pt/best.pt) or torchvision detector weights; a path or a URL",
    )
    p.add_argument("--arch", default="fasterrcnn_resnet50_fpn", help=ARCH_HELP)
    p.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    p.add_argument(
        "--score-threshold", type=_fraction, default=0.5, help="keep detections scoring at least this (default 0.5)"
    )
    p.add_argument(
        "--annotations",
        default=None,
        help="a COCO json whose images[].file_name match the images: its image ids go into the results",
    )
    p.add_argument(
        "--batch-size", type=_int_at_least(1), default=1, help="images or video frames per forward pass (default 1)"
    )
    p.add_argument(
        "--workers",
        type=_int_at_least(0),
        default=1,
        help="image-decoding processes (default 1; 0: in the main process); a video is decoded in a thread",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument(
        "--bf16",
        action="store_true",
        help="run the network in bfloat16 (boxes and scores in float32): about 2x faster on CPUs with "
        "AVX-512 BF16 or AMX, and on GPUs",
    )
    p.add_argument("--recursive", action="store_true", help="look for images and videos in sub-folders too")
    p.add_argument("--no-images", action="store_true", help="write the json only, no annotated copies of images")
    video = p.add_argument_group("video, camera and stream sources")
    video.add_argument(
        "--stride", type=_int_at_least(1), default=1, help="process every K-th frame (default 1: every frame)"
    )
    video.add_argument(
        "--max-frames", type=_int_at_least(1), default=None, help="stop each video after this many processed frames"
    )
    video.add_argument("--no-video", action="store_true", help="write the per-frame json only, no annotated video")
    video.add_argument(
        "--show", action="store_true", help="show the annotated frames live in a window (where there is a display)"
    )
    _add_tta(p)
    _add_backend(p)


def _run_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fasterrcnn.data.video_source import VIDEO_SUFFIXES, import_av, is_live_source, is_video_file
    from fasterrcnn.engine.config import ConfigError
    from fasterrcnn.inference.detector import Detector
    from fasterrcnn.inference.predict_files import IMAGE_SUFFIXES, collect_images, predict_files

    _setup_logging()
    sources = list(args.sources) + list(args.more_sources)
    if not sources:
        raise ConfigError(
            "predict: give at least one SOURCE (image or video files, folders, globs, a camera index, a stream URL)"
        )
    live = [s for s in sources if is_live_source(s)]
    named = [s for s in sources if not is_live_source(s)]
    files = collect_images(named, recursive=args.recursive, suffixes=IMAGE_SUFFIXES + VIDEO_SUFFIXES) if named else []
    videos = [p for p in files if is_video_file(p)]
    paths = [p for p in files if not is_video_file(p)]
    if videos or live:
        import_av()  # PyAV missing: one clear error before any work, not one per video
    out = _output_folder(args.out, "--out")
    detector = Detector.load(
        args.weights,
        arch=args.arch,
        device=args.device,
        score_threshold=args.score_threshold,
        bf16=args.bf16,
        backend=args.backend,
        threads=args.threads,
        tta=_tta_options(args),
    )
    failed = False
    if paths:
        summary = predict_files(
            detector,
            paths,
            out,
            batch_size=args.batch_size,
            workers=args.workers,
            draw=not args.no_images,
            ann_file=args.annotations,
        )
        rate = summary.num_images / max(summary.seconds, 1e-9)
        print(
            f"{summary.num_detections} detections (score >= {args.score_threshold}) in {summary.num_images} images, "
            f"{summary.seconds:.1f} s ({rate:.2f} img/s) on {detector.device}"
        )
        print(
            f"written: {summary.out_dir / 'predictions.json'}, {summary.out_dir / 'images.json'}"
            + ("" if args.no_images else f", {summary.out_dir / 'images'}/")
        )
        if summary.skipped:
            print(f"skipped {len(summary.skipped)} image(s) that could not be read:", file=sys.stderr)
            for err in summary.skipped:
                print(f"  {err}", file=sys.stderr)
            failed = True
    if videos or live:
        failed |= _predict_videos(detector, videos, live, Path(out) / "videos", args)
    return 1 if failed else 0


def _predict_videos(detector, videos, live: list[str], out, args: argparse.Namespace) -> bool:
    """Each video file, then each camera or stream, into ``out``; True when one could not be read whole."""
    from fasterrcnn.data.video_source import VideoError, source_name
    from fasterrcnn.inference.predict_video import predict_video

    names = _video_output_names(videos) + [source_name(s) for s in live]
    failed = []
    for source, name in zip([*videos, *live], names):
        try:
            summary = predict_video(
                detector,
                source,
                out,
                name=name,
                batch_size=args.batch_size,
                stride=args.stride,
                max_frames=args.max_frames,
                draw=not args.no_video,
                show=args.show,
            )
        except VideoError as e:
            if str(source) in live:
                raise  # a camera or stream that cannot be opened is the whole job failing
            failed.append(str(e))  # a file: named and counted, the others still run
            continue
        dropped = f", {summary.dropped} dropped (the model was slower than the source)" if summary.dropped else ""
        print(
            f"{source}: {summary.detections} detections (score >= {args.score_threshold}) in {summary.frames} "
            f"frames{dropped}, {summary.seconds:.1f} s ({summary.fps:.1f} frames/s) on {detector.device}"
        )
        print(f"written: {summary.json_path}" + (f", {summary.video_path}" if summary.video_path else ""))
        if summary.error:
            failed.append(f"{summary.error}; the {summary.frames} frames before it are in {summary.json_path}")
    if failed:
        print(f"{len(failed)} video(s) could not be read whole:", file=sys.stderr)
        for err in failed:
            print(f"  {err}", file=sys.stderr)
    return bool(failed)


def _video_output_names(videos) -> list[str]:
    """Each video's output name: its name relative to the videos' common folder, without the suffix, or with
    it when two videos would otherwise share a name (clip.mp4 and clip.avi)."""
    from pathlib import PurePosixPath

    from fasterrcnn.inference.predict_files import output_names

    full = output_names(videos) if videos else []
    stems = [str(PurePosixPath(n).with_suffix("")) for n in full]
    return [stem if stems.count(stem) == 1 else name for stem, name in zip(stems, full)]


# ---- explain ------------------------------------------------------------------------------------


def _add_explain(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="the image to explain")
    p.add_argument(
        "--weights", required=True, help="a training checkpoint (last.pt/best.pt) or torchvision detector weights"
    )
    p.add_argument(
        "--annotations",
        default=None,
        metavar="ANN",
        help="ground truth for the anchor labels: a COCO instances json (the record with the image's "
        "file name) or a Pascal VOC xml",
    )
    p.add_argument("--out", default=None, help="output folder (default: explain/<image stem>)")
    p.add_argument("--arch", default="fasterrcnn_resnet50_fpn", help=ARCH_HELP)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument(
        "--level",
        default=None,
        help="the level whose anchors anchors.png shows: a name (P4) or an index (default: the middle one)",
    )
    p.add_argument(
        "--score-threshold",
        type=_fraction,
        default=0.5,
        help="detections drawn in two_stage.png and detections.png score at least this (default 0.5)",
    )


def _run_explain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fasterrcnn.data.annotations import load_annotations
    from fasterrcnn.data.images import read_image
    from fasterrcnn.engine.setup import load_model_for_inference, resolve_device
    from fasterrcnn.explain.trace import explain

    device = resolve_device(args.device)
    image = read_image(args.image)
    model, class_names, label_to_cat_id = load_model_for_inference(args.weights, arch=args.arch, device=device)
    target, notes = None, list[str]()
    if args.annotations:
        target, notes = load_annotations(
            args.annotations,
            args.image,
            image_size=(int(image.shape[-2]), int(image.shape[-1])),
            class_names=class_names,
            label_to_cat_id=label_to_cat_id,
        )
    out = Path(args.out) if args.out else Path("explain") / Path(args.image).stem
    result = explain(
        model,
        image,
        out,
        target=target,
        class_names=class_names,
        level=args.level,
        score_threshold=args.score_threshold,
    )
    print(result.summary, end="")
    for note in notes + result.trace.notes:
        print(f"note: {note}")
    written = [p for p, _ in result.figures.values() if p is not None] + [result.summary_path]
    print("written: " + ", ".join(str(p) for p in written))
    return 0


# ---- ablate -------------------------------------------------------------------------------------


def _add_ablate(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="SECTION.KEY=VALUE",
        help="config overrides applied to every cell, e.g. train.batch_size=4 train.threads=2",
    )
    p.add_argument(
        "--cells", default=None, help="comma-separated cell names (default: the whole grid; --list shows it)"
    )
    p.add_argument(
        "--iterations",
        type=_int_at_least(1),
        default=None,
        help="training iterations per cell (default: the config's; the warmup is scaled with it)",
    )
    p.add_argument("--out", default="runs/ablation", help="output folder (default: runs/ablation)")
    p.add_argument(
        "--data",
        nargs="+",
        default=(),
        metavar="PATH",
        help="a synthetic-data folder (made if missing), or COCO jsons: TRAIN [VAL] "
        "(default: the demo's synthetic data)",
    )
    p.add_argument("--config", default=None, help="the baseline's YAML config (default: the demo recipe)")
    p.add_argument("--list", action="store_true", help="list the cells and exit")


def _run_ablate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm.contrib.logging import logging_redirect_tqdm

    from fasterrcnn.experiments.ablate import BUILTIN_CELLS, base_config, command_line, run_ablation, select_cells

    if args.list:
        for cell in BUILTIN_CELLS:
            print(f"{cell.name:22s} {cell.description}: {cell.describe_overrides()}")
        return 0
    _setup_logging()
    cells = select_cells([c.strip() for c in args.cells.split(",") if c.strip()] if args.cells else None)
    base = base_config(config=args.config, iterations=args.iterations, data=list(args.data), overrides=args.overrides)
    argv = [
        *(["--config", args.config] if args.config else []),
        *(["--data", *args.data] if args.data else []),
        *(["--cells", args.cells] if args.cells else []),
        *(["--iterations", str(args.iterations)] if args.iterations else []),
        "--out",
        args.out,
        *args.overrides,
    ]
    with logging_redirect_tqdm():
        results = run_ablation(base, out=args.out, cells=cells, command=command_line(argv))
    reused = sum(r.reused for r in results)
    print((Path(args.out) / "ablation.md").read_text())
    print(
        f"{len(results)} cell(s), {reused} re-used from earlier runs; table and plot: "
        f"{Path(args.out) / 'ablation.md'}, {Path(args.out) / 'ablation.png'}"
    )
    return 0


SUBCOMMANDS: list[Subcommand] = [
    Subcommand("train", "train a detector (no arguments: the built-in synthetic demo)", _add_train, _run_train),
    Subcommand("evaluate", "COCO and VOC metrics of a checkpoint on a dataset", _add_evaluate, _run_evaluate),
    Subcommand(
        "predict",
        "detect objects in images, videos, cameras and streams: COCO results json and annotated "
        "images, per-frame json and annotated videos (exit 1 when an image or video could not be read whole)",
        _add_predict,
        _run_predict,
    ),
    Subcommand(
        "explain",
        "run a detector on one image stage by stage: one figure per stage and a summary",
        _add_explain,
        _run_explain,
    ),
    Subcommand(
        "ablate",
        "the paper's experiments: a grid of training runs, one change each against a baseline, "
        "with a table and plots (finished cells are re-used)",
        _add_ablate,
        _run_ablate,
    ),
    Subcommand(
        "export",
        "export a detector to ONNX, OpenVINO IR or TorchScript (pixels in, detections out, class names inside)",
        _add_export,
        _run_export,
    ),
    Subcommand(
        "quantize",
        "int8 post-training quantization (OpenVINO NNCF) calibrated on training images: an OpenVINO IR",
        _add_quantize,
        _run_quantize,
    ),
    Subcommand("synth", "write the synthetic shapes dataset (COCO json, optionally VOC)", _add_synth, _run_synth),
    Subcommand(
        "synth-video",
        "write a video of the synthetic shapes moving (to try predict on video)",
        _add_synth_video,
        _run_synth_video,
    ),
    Subcommand(
        "check-data",
        "check a COCO json or VOC root: counts, box sizes, problems (exit 0: clean, 1: problems listed, 2: unusable)",
        _add_check_data,
        _run_check_data,
    ),
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


def _usage_errors() -> tuple[type[Exception], ...]:
    """Errors that are the user's to fix (config, checkpoint, a non-finite loss): a message, no traceback."""
    from fasterrcnn.deploy.export import MissingExtraError
    from fasterrcnn.deploy.graph import ExportError
    from fasterrcnn.deploy.runtimes import BackendOptionError, ExportedFileError
    from fasterrcnn.engine.checkpoint import CheckpointError
    from fasterrcnn.engine.config import ConfigError
    from fasterrcnn.engine.trainer import NonFiniteLossError
    from fasterrcnn.model.weights import WeightsError

    return (
        ConfigError,
        CheckpointError,
        NonFiniteLossError,
        WeightsError,
        ExportError,
        ExportedFileError,
        BackendOptionError,
        MissingExtraError,
    )


def main(argv: list[str] | None = None) -> int:
    from fasterrcnn.data.report import DataError

    args = build_parser().parse_args(argv)
    user_errors: tuple[type[Exception], ...] = (DataError, OSError, *_usage_errors())
    try:
        return int(args._run(args) or 0)
    except BrokenPipeError:  # output piped into e.g. `head`, which has closed: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except user_errors as e:  # bad input: the message names the file, record and field
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
