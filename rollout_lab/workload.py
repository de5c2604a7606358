"""The shipped prompt set (generated arithmetic problems with exact, verifiable answers) and the rewards a run can score it with."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

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


def math_answer(text: str, token_ids: list[int], problem: Problem) -> float:
    """The task's reward: 1 when the first integer in the completion is the answer, 0.1 for a wrong integer, else 0."""
    match = _INTEGER.search(text)
    if match is None:
        return 0.0
    return 1.0 if int(match.group()) == problem.answer else 0.1


def even_tokens(text: str, token_ids: list[int], problem: Problem) -> float:
    """The fraction of even token ids in the completion: a reward any model earns, for one that cannot do the task.

    Random tiny models never write an integer, so `math` scores all their samples 0 and GRPO's advantages
    vanish; this one is dense (~1/sqrt(4n) spread over n tokens), so samples of one prompt almost never tie,
    and depends on the ids alone (any tokenizer, no decoding), so the policy moves every step."""
    return sum(1 for t in token_ids if t % 2 == 0) / len(token_ids) if token_ids else 0.0


# workload.reward: a completion's (text, token ids, problem) -> its reward, as TRL's and verl's reward functions.
REWARDS: dict[str, Callable[[str, list[int], Problem], float]] = {"math": math_answer, "even_tokens": even_tokens}


def encode_prompt(tokenizer, problem: Problem) -> list[int]:
    """Token ids of the problem as a chat turn when the tokenizer has a template, else plain text."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": problem.question}], add_generation_prompt=True, tokenize=True
        )
        # transformers 5 returns a BatchEncoding here; 4.x returned the list itself.
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer(problem.question)["input_ids"]
