"""`python -m whisper.corpus IN OUT`: transcribe every audio and video file under IN into OUT."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..checkpoints import ModelFormatError
from ..cli import (
    add_decoding_arguments,
    add_model_arguments,
    add_subtitle_arguments,
    argument_error,
    subtitle_options,
    transcribe_options,
)
from ..model import Whisper
from ..models import ModelNotFoundError, model_dims
from ..writers import FORMATS
from .archive import FAILURES, Archive, plan
from .in_process import run_in_process
from .job import Job, Tally

LOCAL = "local"  # --ray without an address


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m whisper.corpus",
        description=(
            "Transcribe every audio and video file under IN into OUT: OUT/<path under IN>.json per file "
            "(plus the --output-format files). Run it again to resume: files already done are skipped; "
            f"files that fail are listed in OUT/{FAILURES} and the rest go on."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("in_dir", metavar="IN", type=Path, help="folder of recordings (searched recursively)")
    parser.add_argument("out_dir", metavar="OUT", type=Path, help="folder for the transcripts")
    parser.add_argument(
        "--output-format",
        "-f",
        action="append",
        default=[],
        choices=[*FORMATS, "all"],
        help="another format to write besides the JSON (repeat for more)",
    )
    parser.add_argument("--retry-failed", action="store_true", help=f"try the files in OUT/{FAILURES} again")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    ray = parser.add_argument_group("Ray (pip install -r requirements-corpus.txt)")
    ray.add_argument(
        "--ray",
        nargs="?",
        const=LOCAL,
        default=None,
        metavar="ADDRESS",
        help="run on Ray: alone, a local cluster on this machine; with an address, join that cluster",
    )
    ray.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local cluster (default: all)")
    ray.add_argument("--ray-object-store-mb", type=int, default=None, help="object store of the local cluster")
    ray.add_argument(
        "--holders", type=int, default=None, help="model holders (default: one per GPU, else per spare CPU)"
    )
    add_model_arguments(parser, batch_size=8)
    add_decoding_arguments(parser)
    add_subtitle_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (error := argument_error(args)) is not None:
        print(error, file=sys.stderr)
        return 2
    if not args.in_dir.is_dir():
        print(f"{args.in_dir} is not a folder: give the folder that holds the recordings", file=sys.stderr)
        return 2
    try:
        dims = model_dims(args.model)
    except (ModelNotFoundError, ModelFormatError) as error:
        print(f"cannot load the model: {error}", file=sys.stderr)
        return 1
    formats = FORMATS if "all" in args.output_format else tuple(dict.fromkeys(args.output_format))
    archive = Archive(args.in_dir, args.out_dir, formats, subtitle_options(args))
    archive.remove_partials()
    work = plan(archive, retry_failed=args.retry_failed)
    print(
        f"{len(work.todo)} files to transcribe, {work.done} done before"
        + (f", {len(work.failed)} failed before (--retry-failed tries them again)" if work.failed else ""),
        file=sys.stderr,
    )
    if not work.todo:
        return 1 if work.failed else 0
    # Whisper(dims) only to ask whether the model is multilingual: MLX makes no weights until used.
    options = transcribe_options(args, multilingual=Whisper(dims).is_multilingual)
    job = Job(args.model, options, args.batch_size, args.quantize, args.device)
    tally = Tally(len(work.todo), show=args.progress)
    try:
        if args.ray is None:
            run_in_process(job, archive, work.todo, tally)
        else:
            try:
                from .on_ray import run_on_ray
            except ImportError as missing:
                print(
                    f"--ray needs Ray Data, which is not installed here ({missing}); "
                    "install it with: pip install -r requirements-corpus.txt",
                    file=sys.stderr,
                )
                return 2
            address = None if args.ray == LOCAL else args.ray
            limits = {"cpus": args.ray_cpus, "object_store_mb": args.ray_object_store_mb, "holders": args.holders}
            run_on_ray(job, archive, work.todo, tally, address=address, **limits)
    finally:
        tally.close()
    print(
        f"transcribed {tally.transcribed} files ({tally.audio_seconds / 3600:.2f} h of audio) in "
        f"{tally.elapsed:.0f} s, {tally.speed:.1f}x real time"
        + (f"; {tally.failed} failed: see {args.out_dir / FAILURES}" if tally.failed else ""),
        file=sys.stderr,
    )
    return 1 if tally.failed or work.failed else 0
