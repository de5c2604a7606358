"""Crash signatures: an engine exception turned into a record that can be compared and swept."""
from __future__ import annotations

import re
import traceback
from dataclasses import asdict, dataclass, field
from typing import Optional

# How many of the innermost vLLM frames identify a crash site.
SIGNATURE_FRAMES = 3


@dataclass
class CrashSignature:
    """Exception type, first message line, and the innermost vLLM frames (file:function)."""

    exception_type: str
    message: str
    vllm_frames: list[str] = field(default_factory=list)
    phase: str = "generate"
    step: Optional[int] = None
    traceback: str = ""

    @property
    def key(self) -> str:
        """What two crashes must share to count as the same bug: type and crash site."""
        return f"{self.exception_type}@{'|'.join(self.vllm_frames) or 'no-vllm-frame'}"

    def to_dict(self) -> dict:
        return asdict(self) | {"key": self.key}


class EngineCrash(RuntimeError):
    """Raised by a sampler worker when its engine fails; picklable, so it crosses Ray."""

    def __init__(self, signature: CrashSignature):
        super().__init__(f"{signature.exception_type}: {signature.message}")
        self.signature = signature

    def __reduce__(self):
        return (EngineCrash, (self.signature,))


def _vllm_frame(filename: str, function: str) -> Optional[str]:
    match = re.search(r"[/\\](vllm[/\\].*)$", filename)
    if match is None:
        return None
    return f"{match.group(1).replace(chr(92), '/')}:{function}"


def crash_signature(exc: BaseException, phase: str = "generate", step: Optional[int] = None) -> CrashSignature:
    """Signature of an exception, looking through chained causes for the innermost vLLM frames."""
    frames: list[str] = []
    seen = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for frame in traceback.extract_tb(current.__traceback__):
            name = _vllm_frame(frame.filename, frame.name)
            if name is not None:
                frames.append(name)
        current = current.__cause__ or current.__context__
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return CrashSignature(
        exception_type=type(exc).__name__,
        message=message[:300],
        vllm_frames=frames[-SIGNATURE_FRAMES:],
        phase=phase,
        step=step,
        traceback="".join(traceback.format_exception(exc))[-8000:],
    )
