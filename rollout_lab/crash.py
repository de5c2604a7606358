"""Crash signatures: an engine exception turned into a record that can be compared and swept."""
from __future__ import annotations

import re
import traceback
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

# How many of the innermost vLLM frames identify a crash site.
SIGNATURE_FRAMES = 3
# The crash site of a key whose exception went through no vLLM frame.
NO_VLLM_FRAME = "no-vllm-frame"


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
        return f"{self.exception_type}@{'|'.join(self.vllm_frames) or NO_VLLM_FRAME}"

    @property
    def site(self) -> Optional[str]:
        """The innermost vLLM frame (vllm/<file>:<function>); None when the crash had none."""
        return self.vllm_frames[-1] if self.vllm_frames else None

    def __str__(self) -> str:
        return self.key

    @classmethod
    def parse(cls, key: str) -> CrashSignature:
        """The signature a key (str of one) names: its type and frames, no message."""
        exception_type, at, frames = key.partition("@")
        if not at or not exception_type:
            raise ValueError(f"crash key {key!r} is not <exception type>@<vllm frames or {NO_VLLM_FRAME}>")
        return cls(exception_type, "", [] if frames == NO_VLLM_FRAME else frames.split("|"))

    def to_dict(self) -> dict:
        """The fields and the key, as summary.json holds them."""
        return asdict(self) | {"key": self.key}

    @classmethod
    def from_dict(cls, data: dict) -> CrashSignature:
        """The inverse of to_dict; type and frames left out are read from the key."""
        fields = dict(data)
        key = fields.pop("key", None)
        if key is not None:
            parsed = cls.parse(key)
            fields.setdefault("exception_type", parsed.exception_type)
            fields.setdefault("vllm_frames", parsed.vllm_frames)
        fields.setdefault("message", "")
        signature = cls(**fields)
        if key is not None and signature.key != key:
            raise ValueError(f"crash key {key!r} does not match its fields ({signature.key})")
        return signature


class EngineCrash(RuntimeError):
    """Raised by a sampler worker when its engine fails; picklable, so it crosses Ray.

    `requests` are what the engine was sampling when it failed (records.SampledRequest), so the
    run dir keeps them for the minimizer."""

    def __init__(self, signature: CrashSignature, requests: Sequence = ()):
        super().__init__(f"{signature.exception_type}: {signature.message}")
        self.signature = signature
        self.requests = list(requests)

    def __reduce__(self):
        return (EngineCrash, (self.signature, self.requests))


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
    text = str(exc).strip()
    # pydantic (vLLM's config classes) says "1 validation error for VllmConfig" first, the reason after.
    message = " ".join(text.split()) if type(exc).__name__ == "ValidationError" else (text.splitlines() or [""])[0]
    return CrashSignature(
        exception_type=type(exc).__name__,
        message=message[:300],
        vllm_frames=frames[-SIGNATURE_FRAMES:],
        phase=phase,
        step=step,
        traceback="".join(traceback.format_exception(exc))[-8000:],
    )
