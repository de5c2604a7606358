"""minimized.json carries the emitted case's block_pool_head; one written before it reads as none."""
import json

from rollout_lab.minimize.handoff import MinimizedResult


def test_the_minimized_block_pool_head_round_trips_and_an_older_file_has_none(tmp_path):
    result = MinimizedResult({"dtype": "float32"}, ["block_pool_head"], "4 prompts", "1 prompt", 20, 300.0, block_pool_head=0.8)
    path = result.write(tmp_path)
    assert MinimizedResult.read(tmp_path) == result
    data = json.loads(path.read_text())
    del data["block_pool_head"]
    path.write_text(json.dumps(data))
    assert MinimizedResult.read(tmp_path).block_pool_head is None
