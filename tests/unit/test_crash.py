import pickle

import pytest

from rollout_lab.crash import EngineCrash, crash_signature


def _raise_from_fake_vllm():
    # Compile code whose filename looks like a vLLM source file, so its frame is a "vLLM frame".
    code = compile("def execute_model():\n    raise IndexError('index 70000 is out of bounds')\n",
                   "/site-packages/vllm/v1/worker/gpu_model_runner.py", "exec")
    namespace = {}
    exec(code, namespace)
    namespace["execute_model"]()


def test_signature_names_type_message_and_innermost_vllm_frame():
    try:
        try:
            _raise_from_fake_vllm()
        except IndexError as inner:
            raise RuntimeError("EngineCore encountered an issue") from inner
    except RuntimeError as exc:
        sig = crash_signature(exc, phase="generate", step=2)
    assert sig.exception_type == "RuntimeError"
    assert sig.message == "EngineCore encountered an issue"
    assert sig.vllm_frames[-1] == "vllm/v1/worker/gpu_model_runner.py:execute_model"
    assert sig.key == "RuntimeError@vllm/v1/worker/gpu_model_runner.py:execute_model"
    assert sig.step == 2 and "IndexError" in sig.traceback


def test_engine_crash_survives_pickling():
    try:
        _raise_from_fake_vllm()
    except IndexError as exc:
        crash = EngineCrash(crash_signature(exc))
    again = pickle.loads(pickle.dumps(crash))
    assert again.signature.key == crash.signature.key
    assert "IndexError" in str(again)


def test_a_config_validation_error_keeps_vllms_reason_not_only_pydantics_header():
    import pydantic

    class Config(pydantic.BaseModel):
        block_size: int

    with pytest.raises(pydantic.ValidationError) as info:
        Config(block_size="sixteen")
    signature = crash_signature(info.value, phase="engine_start")
    assert signature.message.startswith("1 validation error for Config block_size") and "integer" in signature.message
    assert "\n" not in signature.message
