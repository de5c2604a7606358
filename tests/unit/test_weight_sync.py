import torch

from rollout_lab.weight_sync import decode, encode


def test_round_trip_keeps_names_dtypes_and_bits():
    named = [
        ("a.weight", torch.randn(3, 4)),
        ("b.weight", torch.randn(5).to(torch.bfloat16)),
        ("c.bias", torch.randn(2).to(torch.float16)),
    ]
    back = list(decode(encode(named)))
    assert [n for n, _ in back] == ["a.weight", "b.weight", "c.bias"]
    for (_, original), (_, restored) in zip(named, back):
        assert restored.dtype == original.dtype
        assert torch.equal(restored, original)
