"""The reference's batching: shortest first under a token budget, results back in input order."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rollout_lab.reference import reference_logprobs


def test_batched_reference_matches_one_sequence_at_a_time_in_input_order():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval().float()
    sequences = [([1, 2, 3, 4, 5, 6, 7, 8], [9, 10]), ([11, 12], [13, 14, 15]), ([3] * 20, [4]), ([5, 6, 7], [8, 9])]
    one_by_one = []
    for prompt, completion in sequences:  # every position's logits, as a plain forward pass gives them
        ids = torch.tensor([prompt + completion])
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        one_by_one.append([logprobs[len(prompt) - 1 + k, t].item() for k, t in enumerate(completion)])
    batched = reference_logprobs(model, sequences, batch_tokens=16)
    assert [len(b) for b in batched] == [2, 3, 1, 2]
    for a, b in zip(one_by_one, batched):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    # A different first sequence changes only its own result.
    changed = reference_logprobs(model, [([1, 2, 3, 4, 5, 6, 7, 1], [9, 10])] + sequences[1:], batch_tokens=16)
    assert changed[0] != batched[0] and changed[1:] == batched[1:]
