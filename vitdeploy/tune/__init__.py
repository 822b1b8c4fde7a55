"""``vitdeploy tune``: the fastest accurate CPU path for this machine, measured and recorded.

A user feature above the stages (beside :mod:`vitdeploy.pipeline`), one module per step:

What is fastest differs from CPU to CPU (on an AVX2-only EPYC the 7-bit int8 file on onnxruntime
wins; with VNNI the full-range file; with avx512_bf16/AMX OpenVINO's bf16 may), so nothing is
guessed. Given an export folder (fp32 with its onnxruntime-CPU variant, int8 Q/DQ), tune

1. lists the candidates (:mod:`.candidates`): onnxruntime fp32 (the fused CPU variant), int8
   full range and 7-bit, fp8; OpenVINO fp32, bf16, int8 (f32 or bf16 elsewhere) and int8 7-bit —
   each that cannot run here with its reason;
2. makes the int8 form the folder lacks from its fp32 file (:func:`.candidates.ensure_int8_forms`, the same
   quantizer and calibration images as the export);
3. measures each candidate's accuracy (:mod:`.accuracy`) against eager fp32 (or the fp32 graph when no model is at
   hand): labelled top-1 when a labelled folder is given, else worst cosine and top-1 agreement on
   real photographs;
4. times every candidate side by side in interleaved rounds at each batch size
   (:mod:`.timing`), and in each backend's throughput mode
   (:mod:`vitdeploy.benchmarks.throughput`);
5. picks the fastest within the accuracy gate (:mod:`.selection`) and writes ``tune.json``
   (:mod:`vitdeploy.tune_manifest`), ``tune.md`` and a latency-vs-accuracy plot (:mod:`.report`) into
   the folder; :mod:`.run` holds the plan and the steps in order.

``runtimes.load(folder)`` and ``vitdeploy predict FOLDER`` then run the choice.
"""

from vitdeploy.tune.run import TunePlan, TuneResult, tune

__all__ = ["TunePlan", "TuneResult", "tune"]
