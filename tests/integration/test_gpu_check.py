"""scripts/gpu_check.py, run on the CPU with a tiny model: the JSON a GPU machine would write (parity against
transformers, prefill/decode timings of full vs lighttransfer in float32 and bfloat16), bf16 halving bench's bytes."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_and_writes_its_report(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "gpu_check.json"
    assert script.main(["--cpu", "--model", "tiny", "--contexts", "64", "--batches", "1", "--new-tokens", "8",
                        "--budget-s", "1e9", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["backend"] == "cpu" and report["parity"]["ok"] and report["skipped_dtypes"] == []
    fp32, bf16 = report["speed"]
    assert (fp32["dtype"], bf16["dtype"]) == ("float32", "bfloat16")
    assert 2 * bf16["weights_bytes"] == fp32["weights_bytes"]
    for a, b in zip(fp32["records"], bf16["records"]):
        assert a["method"] == b["method"] and 2 * b["kv_bytes"] == a["kv_bytes"]
        assert a["decode_tokens_per_s"] > 0 and b["prefill_tokens_per_s"] > 0
    assert [r["method"] for r in fp32["records"]] == ["full", "lighttransfer"]
