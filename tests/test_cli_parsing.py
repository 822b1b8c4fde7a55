"""Argument errors through the real entry point: one line in the subcommand's name, found at parse time."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vitdeploy.cli import main


def one_line(capsys, *argv: str) -> str:
    status = main(list(argv))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 2 and captured.out == "" and len(lines) == 1, captured.err
    return lines[0]


def test_an_unknown_option_is_reported_by_its_subcommand(capsys, tmp_path) -> None:
    line = one_line(capsys, "export", "vit_tiny_patch16_224", "-o", str(tmp_path / "m.onnx"), "--bogus")
    assert line.startswith("vitdeploy export: error: unrecognized arguments: --bogus"), line
    assert not (tmp_path / "m.onnx").exists()


def test_an_option_of_another_command_says_whose_it_is(capsys, tmp_path) -> None:
    """`fp64` lands in deploy's optional SOURCE; the line must still be about --precision, in deploy's name."""
    line = one_line(capsys, "deploy", "-o", str(tmp_path / "d"), "--precision", "fp64")
    assert line.startswith("vitdeploy deploy: error: unrecognized arguments: --precision"), line
    assert "--precision is an option of export" in line and "not of deploy" in line
    assert "the 'fp64' after it was read as a positional argument" in line


def test_a_bad_choice_names_the_option_and_the_choices(capsys, tmp_path) -> None:
    line = one_line(capsys, "export", "vit_tiny_patch16_224", "-o", str(tmp_path / "m.onnx"), "--precision", "fp64")
    assert line.startswith("vitdeploy export: error: argument --precision: invalid choice: 'fp64'"), line
    assert "'int8'" in line and "'fp8'" in line


@pytest.mark.parametrize("argv, expected", [
    (["export", "vit_tiny_patch16_224", "-o", "{tmp}/m.onnx", "--batch", "0:4"],
     "vitdeploy export: error: argument --batch: '0:4' must be positive and non-decreasing (MIN:MAX)"),
    (["export", "vit_tiny_patch16_224", "-o", "{tmp}/m.onnx", "--height", "1:2:3"],
     "vitdeploy export: error: argument --height: '1:2:3' is not of the form MIN:MAX"),
    (["deploy", "-o", "{tmp}/d", "--resolution", "448:224"],
     "vitdeploy deploy: error: argument --resolution: '448:224' must be positive and non-decreasing"),
    (["deploy", "-o", "{tmp}/d", "--bench-batch", "1,x"],
     "vitdeploy deploy: error: argument --bench-batch: '1,x' must be comma-separated integers"),
    (["build", "{tmp}/m.onnx", "--batch", "1:x:8"], "vitdeploy build: error: argument --batch: '1:x:8' must be integers"),
    (["verify", "{tmp}/m.onnx", "--batch", "1,0"], "vitdeploy verify: error: argument --batch: '1,0' must list positive"),
    (["verify", "{tmp}/m.onnx", "--resolution", "32y32"],
     "vitdeploy verify: error: argument --resolution: '32y32' is not N or HxW"),
    (["bench", "vit_tiny_patch16_224", "--resolution", "224x"],
     "vitdeploy bench: error: argument --resolution: '224x' is not N or HxW"),
    (["inspect", "vit_tiny_patch16_224", "--resolution", "0"],
     "vitdeploy inspect: error: argument --resolution: '0' must be a positive N or HxW"),
], ids=lambda value: " ".join(value[:1] + value[-2:]) if isinstance(value, list) else None)
def test_ranges_are_checked_when_parsed(capsys, tmp_path, argv, expected) -> None:
    line = one_line(capsys, *(arg.format(tmp=tmp_path) for arg in argv))
    assert line.startswith(expected), line


def test_range_errors_arrive_before_torch_is_imported(tmp_path) -> None:
    """The old check ran after torch loaded (3.5 s); the parse-time one needs none of the heavy packages."""
    code = f"""
import json, sys
from vitdeploy.cli import main
codes = [main(["export", "vit_tiny_patch16_224", "-o", {str(tmp_path / 'm.onnx')!r}, "--batch", "0:4"]),
         main(["deploy", "-o", {str(tmp_path / 'd')!r}, "--batch", "4:1"])]
print(json.dumps([codes, sorted(m for m in ("torch", "onnx", "onnxruntime", "timm") if m in sys.modules)]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    codes, heavy = json.loads(proc.stdout)
    assert codes == [2, 2] and heavy == [], proc.stderr
    assert proc.stderr.count("argument --batch: ") == 2, proc.stderr


def test_top_level_help_describes_what_deploy_and_export_write(capsys) -> None:
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "deploy the whole pipeline: export fp32, fp16 and int8 ONNX" in text
    assert "export export a checkpoint to ONNX (dynamic batch and resolution; fp32, fp16, or int8/fp8 Q/DQ)" in text


def test_metavars_are_the_same_for_the_same_kind_of_value() -> None:
    import argparse

    from vitdeploy.cli import build_parser
    from vitdeploy.cli.common import non_negative_int, opset, positive_int

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    seen = []
    for name, command in commands.choices.items():
        for action in command._actions:
            if not action.option_strings or action.nargs == 0:
                continue
            where = f"{name} {action.option_strings[-1]}"
            seen.append(where)
            if action.dest == "json":
                assert action.metavar == "PATH", where
            if action.type in (int, positive_int, non_negative_int, opset) and action.choices is None:
                assert action.metavar in ("N", "PORT", "SECONDS"), (where, action.metavar)
            if action.choices is None:
                assert action.metavar is not None, f"{where} shows argparse's default {action.dest.upper()}"
    assert "predict --top-k" in seen and "check --json" in seen
