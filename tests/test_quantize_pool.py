"""An attention-pool (MAP) model through the int8 float-fallback search: its last hidden state is both a graph
output and the input of the pool's linear layers, and the search keeps the two apart."""

from __future__ import annotations

from conftest import make_model, tiny_config

from vitdeploy.exporters.onnx_export import ExportOptions, export_onnx
from vitdeploy.exporters.quantize import QuantizeOptions
from vitdeploy.exporters.quantize_onnx import quantize_onnx
from vitdeploy.metadata import quantization_record, read_onnx_metadata


def test_the_fallback_search_runs_on_an_attention_pool_model(tmp_path):
    config = tiny_config(family="siglip", pooling="map", class_token=False, num_classes=0,
                         pos_embed_resample="huggingface")
    source = tmp_path / "map.onnx"
    export_onnx(make_model(config), source, ExportOptions(batch=(1, 2), validate=False, cpu_variant=False,
                                                          preflight=False, outputs=("pooler_output", "last_hidden_state")))
    # a headroom no int8 graph reaches: the search measures every probe set and tries layers
    options = QuantizeOptions(fallback_cosine=0.999999, fallback_trials=2, gate_trials=2)
    result = quantize_onnx(source, tmp_path / "map-int8.onnx", options=options, validate=False, calibration_size=16,
                           cpu_variant=False)
    record = quantization_record(read_onnx_metadata(result.path))
    fallback = record["fallback"]
    assert fallback["tried"], fallback
    assert set(fallback["initial"]) == {"pooler_output", "last_hidden_state"}
