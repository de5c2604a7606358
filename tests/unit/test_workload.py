from rollout_lab.sampler import request_seed
from rollout_lab.workload import Problem, make_problems, math_answer


def test_problems_are_deterministic_and_correct():
    a, b = make_problems(20, seed=3), make_problems(20, seed=3)
    assert a == b
    assert make_problems(20, seed=4) != a
    for p in a:
        left, op, right = p.question.split("?")[0].removeprefix("What is ").split()
        assert p.answer == eval(f"{left} {op} {right}")


def test_reward_reads_the_first_integer():
    p = Problem("What is 2 + 3?", 5)
    assert math_answer(" 5, because 2+3", [], p) == 1.0
    assert math_answer("It is 6 or 5", [], p) == 0.1
    assert math_answer("five", [], p) == 0.0
    assert math_answer("-5", [], Problem("What is 2 - 7?", -5)) == 1.0


def test_request_seed_depends_only_on_coordinates():
    assert request_seed(0, 1, 2, 3) == request_seed(0, 1, 2, 3)
    seeds = {request_seed(0, s, p, i) for s in range(3) for p in range(8) for i in range(4)}
    assert len(seeds) == 3 * 8 * 4
    assert all(0 <= s < 2**31 - 1 for s in seeds)
