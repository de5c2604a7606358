"""The float32 teacher-forced reference: the transformers model in float32, and the logprob it gives
each sampled token of a (prompt, completion) pair. The minimizer, the hunt and the localizer judge
vLLM's logprobs against it; the trainer pads its batches the same way."""
from __future__ import annotations


def load_reference(model_path: str, device: str = "cpu"):
    """The transformers model in float32 on `device`: the reference that the trainer would be."""
    import torch
    from transformers import AutoModelForCausalLM

    if device.startswith("cuda"):
        # float32 means float32: cuDNN convolutions (Mamba's conv1d) default to TF32 on CUDA.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).eval()


def pad_sequences(sequences: list[tuple[list[int], list[int]]]):
    """(input_ids, attention_mask) of (prompt, completion) pairs, right-padded with 0 to the longest."""
    import torch

    lengths = [len(p) + len(c) for p, c in sequences]
    input_ids = torch.zeros((len(sequences), max(lengths)), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ((prompt, completion), length) in enumerate(zip(sequences, lengths)):
        input_ids[row, :length] = torch.tensor(prompt + completion)
        attention_mask[row, :length] = 1
    return input_ids, attention_mask


def reference_logprobs(model, sequences: list[tuple[list[int], list[int]]], batch_tokens: int = 4096,
                       on_batch=None) -> list[list[float]]:
    """Teacher-forced float32 logprob of each completion token, for (prompt, completion) pairs.

    Sequences go through the model shortest first, in batches of at most `batch_tokens` padded
    tokens, so mixed lengths waste little on padding; the result is in the input's order.
    `on_batch()`, if given, is called after each batch.
    """
    import torch

    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]) + len(sequences[i][1]))
    batches: list[list[int]] = []
    for i in order:
        length = len(sequences[i][0]) + len(sequences[i][1])
        if batches and (len(batches[-1]) + 1) * length <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    out: dict[int, list[float]] = {}
    for batch in batches:
        chunk = [sequences[i] for i in batch]
        input_ids, attention_mask = (t.to(model.device) for t in pad_sequences(chunk))
        # Logits at position t predict token t+1; only the completions' positions need the lm_head
        # (a [tokens x vocab] float32 tensor for the whole batch costs more than the model).
        first = min(len(p) for p, _ in chunk) - 1
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=input_ids.shape[1] - first).logits
        for row, (i, (prompt, completion)) in enumerate(zip(batch, chunk)):
            start = len(prompt) - 1 - first
            rows = torch.log_softmax(logits[row, start : start + len(completion)].float(), dim=-1)
            out[i] = rows.gather(-1, torch.tensor(completion, dtype=torch.long, device=rows.device)[:, None])[:, 0].tolist()
        if on_batch is not None:
            on_batch()
    return [out[i] for i in range(len(sequences))]
