"""Helpers shared by the CLI commands: errors, progress, JSON output, range parsing."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from vitdeploy.console import progress
from vitdeploy.files import atomic_write_json

__all__ = ["CLIError", "progress", "write_json", "parse_range", "parse_int_list", "parse_sizes", "command_line",
           "ArgumentParser", "CommandParser", "range_arg", "range3_arg", "int_list_arg", "sizes_arg", "positive_float", "positive_int", "output_file", "output_folder", "onnx_output", "cosine", "opset",
           "non_negative_int", "add_pos_embed_resample", "add_model_override", "model_variant",
           "refuse_model_override", "add_quantize_arguments", "parse_op_list", "op_list", "quantize_options"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``vitdeploy <command>: error: ...`` and exit status 2 (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class CommandParser(ArgumentParser):
    """A subcommand's parser: it reports arguments it does not know itself, as ``vitdeploy <command>: error:``.

    (argparse hands a subparser's leftovers to the top-level parser, whose error names no command.)
    ``elsewhere`` maps option strings of the other commands to their names, for a hint.
    """

    elsewhere: dict[str, list[str]]

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            given = list(args) if args is not None else sys.argv[1:]
            self.error(f"unrecognized arguments: {' '.join(extras)}{self._hint(extras, given)}")
        return namespace, extras

    def _hint(self, extras: list[str], given: list[str]) -> str:
        command = self.prog.split()[-1]
        hints = []
        for extra in (extra for extra in extras if extra.startswith("-")):
            option = extra.split("=", 1)[0]
            owners = getattr(self, "elsewhere", {}).get(option)
            if owners:
                hints.append(f"{option} is an option of {', '.join(owners)}, not of {command}")
            at = given.index(extra) if extra in given else -1
            value = given[at + 1] if "=" not in extra and 0 <= at < len(given) - 1 else None
            if value is not None and not value.startswith("-") and value not in extras:
                hints.append(f"the {value!r} after it was read as a positional argument")
        return f" ({'; '.join(hints)})" if hints else ""


def output_file(text: str) -> str:
    """argparse type: a file path that can be written (checked before any work; see ``check_output_file``)."""
    from vitdeploy.files import check_output_file

    try:
        check_output_file(text, "path")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def output_names(text: str) -> tuple[str, ...]:
    """``--outputs``: known output names (whether the model has them is checked once it is loaded)."""
    from vitdeploy.outputs import parse_outputs

    try:
        return parse_outputs(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def output_folder(text: str) -> str:
    """argparse type: a folder that can be written in (it may not exist yet)."""
    from vitdeploy.files import check_output_folder

    try:
        check_output_folder(text, "folder")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def onnx_output(text: str) -> str:
    """argparse type: a writable path ending in ``.onnx``."""
    if Path(text).suffix.lower() != ".onnx":
        raise argparse.ArgumentTypeError(f"{text!r} must end in .onnx")
    return output_file(text)


def opset(text: str) -> int:
    """argparse type: an ONNX opset this machine can export and validate."""
    from vitdeploy.exporters.onnx_export import check_opset

    try:
        return check_opset(int(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error) if text.strip().lstrip("-").isdigit() else
                                         f"{text!r} is not an integer") from None


def _number(text: str, kind: type, what: str, ok: Callable[[float], bool], rule: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _number(text, float, "a number", lambda v: 0 < v < float("inf"), "a number > 0")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _number(text, int, "an integer", lambda v: v >= 0, "an integer >= 0")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _number(text, int, "an integer", lambda v: v >= 1, "an integer >= 1")


def cosine(text: str) -> float:
    """argparse type: a cosine similarity threshold in (0, 1]."""
    return _number(text, float, "a number", lambda v: 0 < v <= 1, "a cosine threshold in (0, 1]")


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON atomically."""
    atomic_write_json(path, data)


def _range(text: str, parts: int) -> tuple[int, ...]:
    form = "MIN:MAX" if parts == 2 else "MIN:OPT:MAX"
    pieces = text.split(":")
    if len(pieces) == 1:
        pieces = pieces * parts
    if len(pieces) != parts:
        raise ValueError(f"{text!r} is not of the form {form} (or N)")
    try:
        values = tuple(int(p) for p in pieces)
    except ValueError:
        raise ValueError(f"{text!r} must be integers {form}") from None
    if any(v <= 0 for v in values) or list(values) != sorted(values):
        raise ValueError(f"{text!r} must be positive and non-decreasing ({form})")
    return values


def _int_list(text: str) -> list[int]:
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"{text!r} must be comma-separated integers") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{text!r} must list positive integers")
    return values


def _sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        where = repr(item) if item == text.strip().lower() else f"{text!r}: {item!r}"
        try:
            values = [int(p) for p in item.split("x")]
        except ValueError:
            raise ValueError(f"{where} is not N or HxW with integers") from None
        if len(values) not in (1, 2) or any(v <= 0 for v in values):
            raise ValueError(f"{where} must be a positive N or HxW")
        sizes.append((values[0], values[-1]))
    if not sizes:
        raise ValueError(f"{text!r} lists no size")
    return sizes


def parse_range(text: str, what: str, parts: int = 2) -> tuple[int, ...]:
    """Parse ``MIN:MAX`` (or ``MIN:OPT:MAX`` with ``parts=3``; a single ``N`` means N for all)."""
    try:
        return _range(text, parts)
    except ValueError as error:
        raise CLIError(f"--{what} {error}") from None


def parse_int_list(text: str, what: str) -> list[int]:
    """Parse ``1,8,32`` into ``[1, 8, 32]``."""
    try:
        return _int_list(text)
    except ValueError as error:
        raise CLIError(f"--{what} {error}") from None


def batches_within(defaults: tuple[int, ...], low: int, high: int) -> list[int]:
    """A command's default batch sizes, each moved inside ``low..high`` (an artifact's batch range): defaults
    nobody chose never make a batch-1 artifact an error."""
    return sorted({min(max(batch, low), high) for batch in defaults})


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``224,384`` or ``224x320`` → ``[(224, 224), (384, 384)]`` / ``[(224, 320)]``."""
    try:
        return _sizes(text)
    except ValueError as error:
        raise CLIError(f"--resolution {error}") from None


def _checked(parse: Callable[[str], Any], name: str) -> Callable[[str], str]:
    """An argparse type that checks ``text`` with ``parse`` at parse time (before any heavy import) and keeps
    the text, which the command parses again with the same function: argparse then says
    ``argument --batch: '0:4' must be ...``."""
    def check(text: str) -> str:
        try:
            parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text

    check.__name__ = name
    return check


# argparse types for the range and list options (see _checked).
range_arg = _checked(lambda text: _range(text, 2), "range")
range3_arg = _checked(lambda text: _range(text, 3), "range")
int_list_arg = _checked(_int_list, "list")
sizes_arg = _checked(_sizes, "sizes")


def command_line(subcommand: str, argv: list[str] | None = None) -> str:
    """The exact ``vitdeploy SUBCOMMAND ...`` command line when run from the console script, else ``""``."""
    argv = sys.argv if argv is None else argv
    if argv and Path(argv[0]).name in ("vitdeploy", "__main__.py") and subcommand in argv[1:2]:
        return shlex.join(["vitdeploy", *argv[1:]])
    return ""


def add_pos_embed_resample(parser: argparse.ArgumentParser) -> None:
    """The ``--pos-embed-resample`` option of the commands that load a checkpoint for good (export, convert)."""
    from vitdeploy.pos_embed import RESAMPLE_METHODS

    parser.add_argument(
        "--pos-embed-resample", choices=list(RESAMPLE_METHODS),
        help="how position embeddings are resampled at other resolutions, so that they give the logits of the "
        "framework named: " + "; ".join(f"{m.name}: {m.summary}" for m in RESAMPLE_METHODS.values())
        + ". Default: the checkpoint's own (timm files, OpenCLIP and JAX .npz → timm, Hugging Face folders → "
        "huggingface, native files → what they were saved with)",
    )


def model_variant(text: str) -> str:
    """argparse type of ``--model``: a registry variant name (checked at parse time, before torch loads);
    an unknown one is named with the closest."""
    from vitdeploy.variants import VARIANTS, unknown_variant_message

    if text in VARIANTS:
        return text
    raise argparse.ArgumentTypeError(unknown_variant_message(text, listing="`vitdeploy inspect --list` lists them all"))


def add_model_override(parser: argparse.ArgumentParser, what: str = "SOURCE") -> None:
    """The ``--model NAME`` option of the commands that load a checkpoint (``args.model_variant``; passed as
    ``model=`` to :func:`~vitdeploy.checkpoints.resolve_source`)."""
    parser.add_argument(
        "--model", dest="model_variant", type=model_variant, metavar="NAME",
        help=f"load the checkpoint {what} with the architecture of the registry variant NAME instead of the one "
        "detected from its files: for what the weights do not show, such as the QuickGELU of an OpenAI CLIP state "
        "dict (--model vit_base_patch16_clip_quickgelu_224). The checkpoint keeps its classes, image size, labels, "
        "resampling convention and (unless it was only a default) preprocessing; strict loading lists every tensor "
        "that does not fit. `vitdeploy inspect --list` lists the names",
    )


def add_source_check(parser: argparse.ArgumentParser) -> None:
    """The ``--no-source-check`` option of the commands that check an artifact against its checkpoint's
    source library (``args.no_source_check``)."""
    parser.add_argument(
        "--no-source-check", action="store_true",
        help="do not also run the checkpoint's own library (timm for timm state dicts and Hub folders, "
        "transformers for Hugging Face folders, open_clip for OpenCLIP folders) on real photos at the native "
        "and a non-square size and compare; by default an artifact that disagrees with it beyond its precision's tolerance is refused. The report "
        "says whether it was checked, against which library and version, or why not",
    )


def refuse_model_override(model: str | None, source: str, kind: str) -> None:
    """One line when ``--model`` (``model``) was given for ``source``, which is no checkpoint but ``kind``."""
    if model is not None:
        raise CLIError(f"--model {model} forces an architecture on a checkpoint; {source!r} is {kind}")


# ---------------------------------------------------------------------------------------------
# Quantization options (export --precision int8/fp8 and quantize)


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    """The calibration and quantization options ``export`` and ``quantize`` share (int8, fp8)."""
    from vitdeploy.calibration import DEFAULT_CALIBRATION_SIZE
    from vitdeploy.constants import CALIBRATORS, DEFAULT_KEEP_FLOAT, DEFAULT_SMOOTH_THRESHOLD
    from vitdeploy.constants import QUANTIZABLE_ROLES as QUANTIZABLE

    group = parser.add_argument_group("quantization (int8, fp8)")
    group.add_argument("--calibration", metavar="DIR",
                       help="folder of calibration images (default: the bundled photos plus synthetic crops)")
    group.add_argument("--calibration-size", type=positive_int, default=DEFAULT_CALIBRATION_SIZE, metavar="N",
                       help=f"number of calibration images (default {DEFAULT_CALIBRATION_SIZE})")
    group.add_argument("--keep-float", type=op_list(QUANTIZABLE, "role"),
                       default=",".join(DEFAULT_KEEP_FLOAT), metavar="OPS",
                       help=f"roles kept in float, comma-separated or 'none', from {', '.join(QUANTIZABLE)} "
                       f"(AttentionMatMul: both AttentionScores, Q·Kᵀ, and AttentionValues, P·V; "
                       f"default {','.join(DEFAULT_KEEP_FLOAT)})")
    group.add_argument("--calibrator", choices=CALIBRATORS, default="max",
                       help="activation range: the largest magnitude seen (max, default) or a percentile of them")
    group.add_argument("--percentile", type=percentile, default=99.99, metavar="P",
                       help="percentile for --calibrator percentile (default 99.99)")
    group.add_argument("--smooth-alpha", type=smooth_alpha, default=None, metavar="A",
                       help="SmoothQuant migration strength for LayerNorm-output outlier channels, 0 = off "
                       "(default 0.5 for int8, 0 for fp8)")
    group.add_argument("--smooth-threshold", type=smooth_threshold, default=DEFAULT_SMOOTH_THRESHOLD, metavar="R",
                       help="smooth a LayerNorm only if its largest channel maximum is R times the median channel's "
                       f"(default {DEFAULT_SMOOTH_THRESHOLD:g})")
    group.add_argument("--reduce-range", action="store_true",
                       help="int8 weights in 7 bits (+-63) for x86 CPUs without VNNI/AMX, whose 16-bit int8 sums "
                       "saturate on full-range weights (OpenVINO there); not needed for TensorRT or VNNI CPUs")


def parse_op_list(text: str) -> tuple[str, ...]:
    """A comma-separated list of op types or roles (``--fp32-ops``, ``--keep-float``):
    ``"LayerNormalization,Softmax"`` → a tuple; ``"none"`` or ``""`` → empty."""
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(op.strip() for op in text.split(",") if op.strip())


def op_list(allowed: Sequence[str], noun: str) -> Callable[[str], tuple[str, ...]]:
    """argparse type: :func:`parse_op_list` of names each in ``allowed`` (``noun`` says what one is)."""
    def parse(text: str) -> tuple[str, ...]:
        ops = parse_op_list(text)
        unknown = [op for op in ops if op not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {noun}(s) {', '.join(unknown)}; expected some of "
                                             f"{', '.join(allowed)}, or 'none'")
        return ops
    return parse


def percentile(text: str) -> float:
    """argparse type: a calibration percentile in (50, 100]."""
    return _number(text, float, "a number", lambda v: 50 < v <= 100, "a percentile in (50, 100]")


def smooth_alpha(text: str) -> float:
    """argparse type: a SmoothQuant strength in [0, 1]."""
    return _number(text, float, "a number", lambda v: 0 <= v <= 1, "a strength in [0, 1] (0 = off)")


def smooth_threshold(text: str) -> float:
    """argparse type: a ratio of channel maxima, at least 1."""
    return _number(text, float, "a number", lambda v: v >= 1, "a ratio >= 1")


def quantize_options(args: argparse.Namespace, precision: str):  # noqa: ANN201 - QuantizeOptions
    """:class:`~vitdeploy.exporters.quantize.QuantizeOptions` from the parsed arguments."""
    from vitdeploy.exporters.quantize import QuantizeOptions

    return QuantizeOptions(precision=precision, keep_float=args.keep_float,
                           calibrator=args.calibrator, percentile=args.percentile, smooth_alpha=args.smooth_alpha,
                           smooth_threshold=args.smooth_threshold, reduce_range=args.reduce_range)
