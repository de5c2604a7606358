"""The hunt oracles' tolerance row: the engine dtype's, or fp8_kv's for an fp8 KV cache."""
import pytest

from rollout_lab.hunt.space import OracleConfig
from rollout_lab.tolerances import TOLERANCES, clean_agreement, oracle_row


@pytest.mark.parametrize("dtype, kv_cache_dtype, row", [("bfloat16", "fp8", "fp8_kv"), ("float32", "fp8_e4m3", "fp8_kv"),
                                                         ("bfloat16", "auto", "bfloat16"), ("float32", None, "float32")])
def test_an_fp8_kv_cache_reads_its_own_row(dtype, kv_cache_dtype, row):
    assert oracle_row(dtype, kv_cache_dtype) == row


def test_the_fp8_row_is_looser_than_bfloat16_and_above_its_measured_clean_maximum():
    fp8, bf16 = TOLERANCES["fp8_kv"], TOLERANCES["bfloat16"]
    assert fp8.spike_threshold > fp8.clean_max["gpu"] > bf16.spike_threshold
    assert OracleConfig().reference_tolerance["fp8_kv"] == fp8.spike_threshold
    assert "1.6 on GPU" in clean_agreement("fp8_kv")
