"""The shipped prompt set: generated arithmetic problems with exact, verifiable answers."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_INTEGER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int


def make_problems(count: int, seed: int) -> list[Problem]:
    """`count` problems, the same for the same seed on every machine."""
    rng = random.Random(seed)
    problems = []
    for _ in range(count):
        op = rng.choice(sorted(OPERATIONS))
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        problems.append(Problem(f"What is {a} {op} {b}? Answer with just the number.", OPERATIONS[op](a, b)))
    return problems


def reward(completion: str, problem: Problem) -> float:
    """1 when the first integer in the completion is the answer, 0.1 for a wrong integer, else 0."""
    match = _INTEGER.search(completion)
    if match is None:
        return 0.0
    return 1.0 if int(match.group()) == problem.answer else 0.1


def encode_prompt(tokenizer, problem: Problem) -> list[int]:
    """Token ids of the problem as a chat turn when the tokenizer has a template, else plain text."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": problem.question}], add_generation_prompt=True, tokenize=True
        )
        # transformers 5 returns a BatchEncoding here; 4.x returned the list itself.
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer(problem.question)["input_ids"]
