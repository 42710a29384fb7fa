"""Request bodies of the HTTP API (pydantic; unknown fields are refused with a 400 that names them).

Field names and defaults follow OpenAI's API where an endpoint mirrors it (completions, audio.speech), and
the original ``Spiritlm.generate`` keyword arguments in the native ``/v1/spiritlm/generate``. Extra
sampling fields that OpenAI lacks (``top_k``, ``repetition_penalty``, ``output_modality``) are accepted
where they make sense (the openai client sends them through ``extra_body``).
"""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CompletionRequest(_Strict):
    model: str
    prompt: Union[str, list[str], list[int]]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, description="0 = greedy (argmax), as the original's do_sample=False")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=0, description="HF's default 50 applies when sampling; 0 disables it")
    repetition_penalty: float = Field(1.0, gt=0.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=0, lt=2 ** 32)
    echo: bool = False
    output_modality: Literal["text", "speech", "arbitrary"] = "arbitrary"
    user: str | None = None
    # OpenAI fields we accept only at their neutral value (the check names the alternative)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    best_of: int | None = None
    logit_bias: dict | None = None
    suffix: str | None = None


class SpeechRequest(_Strict):
    model: str
    input: str = Field(..., min_length=1, max_length=4096)
    voice: Union[str, int]
    response_format: str = "wav"
    speed: float = 1.0
    stream_format: str | None = None
    instructions: str | None = None
    # sampling of the speech units (the eval harness's TTS defaults)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.8, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=0)
    seed: int | None = Field(None, ge=0, lt=2 ** 32)


class InputItem(_Strict):
    type: Literal["text", "speech"]
    text: str | None = None
    audio: str | None = Field(None, description="base64 of an audio file (wav, flac, ...)")
    units: str | None = Field(None, description="a ready unit string, e.g. [Hu12][Hu7]...")


class GenerateRequest(_Strict):
    model: str
    inputs: list[InputItem] | None = None
    prompt: str | None = Field(None, description="a ready token string instead of inputs")
    output_modality: Literal["text", "speech", "arbitrary"] = "arbitrary"
    force_tokens_to_output_modality: bool = True
    max_new_tokens: int = Field(100, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0.0)
    top_k: int = Field(50, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    seed: int | None = Field(None, ge=0, lt=2 ** 32)
    speaker_id: int | None = None
    voice: str | None = None
    audio_format: Literal["wav", "f32"] = "wav"
    stream: bool = False
