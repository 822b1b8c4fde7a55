"""The int8 instruction-rate study (``python studies/int8_instruction_rate.py``): its C program built and
run for real where the CPU has VNNI, its output read strictly, and one clear line where it cannot run."""

from __future__ import annotations

import json
import shutil

import int8_instruction_rate as study
import pytest

from vitdeploy.cpu_features import cpu_flags

CAN_RUN = "avx512_vnni" in cpu_flags() and shutil.which(study.c_compiler()) is not None


def test_the_rates_are_read_for_the_threads_asked_and_nothing_else_passes():
    output = "VPDPBUSD zmm, 2 threads: 915.9 GOP/s\nVPDPBUSD ymm, 2 threads: 898.4 GOP/s\n"
    assert study.parse_rates(output, 2) == {"zmm": 915.9, "ymm": 898.4}
    with pytest.raises(study.StudyError, match="expected a zmm and a ymm rate for 1 threads"):
        study.parse_rates(output, 1)
    with pytest.raises(study.StudyError, match="expected a zmm and a ymm rate"):
        study.parse_rates("VPDPBUSD zmm, 2 threads: 915.9 GOP/s\n", 2)


def test_the_study_times_the_instruction_or_says_in_one_line_why_it_cannot(tmp_path, capsys):
    output = tmp_path / "rate.json"
    status = study.main(["--threads", "1", "--million-rounds", "1", "--no-library-peak", "--output", str(output)])
    if CAN_RUN:
        assert status == 0
        report = json.loads(output.read_text())
        assert report["command"].startswith("python studies/int8_instruction_rate.py --threads 1")
        rates = report["instruction_gops"]
        assert set(rates) == {"zmm", "ymm"} and min(rates.values()) > 0
        assert report["instruction_ceiling_gops"] == max(rates.values())
        assert "library_peak" not in report
    else:
        assert status == 2 and not output.exists()
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("int8_instruction_rate: ") and ("avx512_vnni" in error or "no C compiler" in error)


def test_a_missing_compiler_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-here")
    output = tmp_path / "rate.json"
    assert study.main(["--no-library-peak", "--output", str(output)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("int8_instruction_rate: ") and "Traceback" not in error
    assert ("no C compiler 'no-such-compiler-here'" in error) if "avx512_vnni" in cpu_flags() else "avx512_vnni" in error
    assert not output.exists()
