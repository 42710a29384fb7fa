"""The FastAPI app: OpenAI-compatible completions, speech and transcription endpoints, the native
interleaved speech+text endpoint, models, health and Prometheus metrics, over one ``serve.engine.Engine``.

    app = build_app(Service(lm, engine, ServeOptions(model_name="spirit-lm-base-7b")))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Safe by default: bearer auth when an API key is set (401 without it; /health stays open), request bodies
over ``max_body_bytes`` and audio over ``max_audio_seconds`` get 413, malformed JSON / unknown fields / bad
values / bad audio / over-long prompts get a 400 JSON error in OpenAI's shape with the same message the CLI
prints, never a traceback. A client that disconnects cancels its requests (their slots free at the next
engine step); an error inside one request fails that request alone.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import logging
import os
import time
import uuid

import anyio
import numpy as np
from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from spiritlm_jax import prompting
from spiritlm_jax.audio import AudioError
from spiritlm_jax.prompting import OutputModality
from spiritlm_jax.speech import SpeechDecodeError
from spiritlm_jax.units import UnitStringError
from spiritlm_jax.vocoder import VocoderInputError

from .audio import StreamingVocoder, pcm16, unit_kind, wav_header
from .engine import Engine, GenerationError, Request, SamplingConfig, ServeError
from .metrics import Metrics
from .schemas import CompletionRequest, GenerateRequest, SpeechRequest

log = logging.getLogger("spiritlm_jax.serve")
SAMPLE_RATE = 16000
CLIENT_ERRORS = (ServeError, GenerationError, prompting.PromptError, AudioError, VocoderInputError, UnitStringError, SpeechDecodeError)


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


@dataclasses.dataclass
class ServeOptions:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 25 * 2 ** 20
    max_audio_seconds: float = 120.0
    audio_chunk_frames: int = 32
    # prompt formats ({units} / {text} are filled in); a few-shot prefix goes in front (``--shots``)
    asr_template: str = "[Speech]{units}[Text]"
    tts_template: str = "[Text]{text}[Speech]"
    asr_max_tokens: int = 200
    tts_max_tokens: int = 500


# ------------------------------------------------------------------------------------------ the service
class Service:
    """The model, its engine and the request plumbing the endpoints share."""

    def __init__(self, lm, engine: Engine, options: ServeOptions):
        self.lm, self.engine, self.options = lm, engine, options
        self.tok = lm.tokenizer
        self.vocab = lm.tokenizer.vocab
        self.metrics = Metrics(engine)
        self.speech_lock = None  # an anyio.Lock, made inside the event loop
        self.draining = False

    # ---------------------------------------------------------------------------------- helpers
    def check_model(self, name: str) -> None:
        if name != self.options.model_name:
            raise HttpError(404, f"model {name!r} is not served here; this server serves "
                                 f"{self.options.model_name!r} (GET /v1/models)", "not_found_error", "model")

    def banned(self, modality: OutputModality, for_speech_out: bool = False) -> np.ndarray:
        mask = self.lm._banned(modality, True)
        if for_speech_out and self.lm.speech_tokenizer is not None and self.lm.speech_tokenizer.vocoder is not None:
            # units the vocoder cannot embed (e.g. [Hu500] for a 500-row table) would end the audio with an
            # error; they are never generated for audio out
            n = self.lm.speech_tokenizer.vocoder.cfg.num_embeddings
            mask = mask.copy()
            mask[list(self.vocab.hubert)[n:]] = True
        return mask

    def speech_tokenizer(self):
        st = self.lm.speech_tokenizer
        if st is None:
            raise HttpError(400, "this server was started without a speech tokenizer; speech in/out is unavailable")
        return st

    def voice_id(self, voice) -> int:
        voc = self.speech_tokenizer().vocoder
        names = voc.speakers or []
        n = voc.cfg.num_speakers
        if isinstance(voice, int) or (isinstance(voice, str) and voice.strip().isdigit()):
            v = int(voice)
            if 0 <= v < n:
                return v
        elif isinstance(voice, str):
            low = [s.lower() for s in names]
            if voice.lower() in low:
                return low.index(voice.lower())
        shown = ", ".join(f"{i}={s}" for i, s in enumerate(names)) if names else f"0..{n - 1}"
        raise HttpError(400, f"voice {voice!r} is not one of the vocoder's speakers ({shown}); pass a name or an index",
                        param="voice")

    async def to_thread(self, fn, *args):
        if self.speech_lock is None:
            self.speech_lock = anyio.Lock()
        async with self.speech_lock:
            return await anyio.to_thread.run_sync(fn, *args)

    def load_audio(self, data: bytes, where: str) -> np.ndarray:
        from spiritlm_jax.audio import load_audio

        try:
            wav = load_audio(data)
        except AudioError as e:
            raise HttpError(400, f"{where}: {e}", param=where) from None
        seconds = wav.size / SAMPLE_RATE
        if seconds > self.options.max_audio_seconds:
            raise HttpError(413, f"{where}: {seconds:.1f} s of audio is over this server's limit of "
                                 f"{self.options.max_audio_seconds:g} s (--max-audio-seconds)", param=where)
        return wav

    # ---------------------------------------------------------------------------------- running requests
    def submit(self, jobs: list[Request], loop, queue: asyncio.Queue) -> None:
        """Check every request first (all or nothing), then queue them; events go to ``queue`` as
        (index, "token", id, logprob, top_ids, top_logprobs) and (index, "finish", reason, error)."""
        for r in jobs:
            self.engine.check(r)
        if self.draining:
            raise HttpError(503, "the server is shutting down (draining in-flight requests); retry elsewhere",
                            "service_unavailable")
        for i, r in enumerate(jobs):
            r.on_token = (lambda i: lambda *a: loop.call_soon_threadsafe(queue.put_nowait, (i, "token") + a) and False)(i)
            r.on_finish = (lambda i: lambda reason, err: loop.call_soon_threadsafe(
                queue.put_nowait, (i, "finish", reason, err)))(i)
        for r in jobs:
            self.engine.submit(r)

    async def events(self, jobs: list[Request], http: HttpRequest):
        """Submit ``jobs`` and yield their events until all finished; a client disconnect cancels them."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self.submit(jobs, loop, queue)
        watcher = asyncio.create_task(self._watch(http, jobs))
        open_jobs = len(jobs)
        try:
            while open_jobs:
                ev = await queue.get()
                if ev[1] == "finish":
                    open_jobs -= 1
                    if ev[3] is not None:
                        log.error("request failed: %s: %s", type(ev[3]).__name__, ev[3])
                yield ev
        finally:
            watcher.cancel()
            for r in jobs:
                if r.finish_reason is None:
                    r.cancel()

    async def _watch(self, http: HttpRequest, jobs: list[Request]) -> None:
        while True:
            if await http.is_disconnected():
                for r in jobs:
                    r.cancel()
                return
            await asyncio.sleep(0.05)

    def default_max_tokens(self, ids: list[int], default: int) -> int:
        """A length the client did not set: ``default`` or what is left of a slot after the prompt (an
        over-long prompt still gets the engine's clear 400)."""
        return max(1, min(default, self.engine.max_len - len(ids)))

    def make_request(self, ids: list[int], max_tokens: int, sampling: SamplingConfig, banned, seed: int) -> Request:
        return Request(list(ids), int(max_tokens), sampling, banned, seed=seed)


def _seed(seed: int | None) -> int:
    return int.from_bytes(os.urandom(4), "little") if seed is None else int(seed)


class TextStream:
    """Incremental detokenization: text = decode(prompt + new)[len(decode(prompt)):], released only when no
    later token can change it (no trailing partial UTF-8 byte, no possible start of a stop string)."""

    def __init__(self, tok, prompt_ids: list[int], stop: list[str]):
        self.tok, self.prompt = tok, list(prompt_ids)
        self.prefix = tok.decode(self.prompt)
        self.ids: list[int] = []
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        full = self.tok.decode(self.prompt + self.ids)[len(self.prefix):]
        for s in self.stop:
            k = full.find(s)
            if k >= 0:
                full, self.stopped = full[:k], True
        self.text = full
        return self._release(final=self.stopped)

    def flush(self) -> str:
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            while end > self.sent and self.text[end - 1] == "\ufffd":
                end -= 1
            end = max(self.sent, end - self.hold)
        out = self.text[self.sent:end]
        self.sent = end
        return out


# ------------------------------------------------------------------------------------------ the app
def build_app(service: Service) -> FastAPI:
    app = FastAPI(title="spiritlm-jax", description="Spirit LM speech+text server (OpenAI-compatible)",
                  lifespan=_lifespan(service))
    options = service.options
    app.state.service = service

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return error_response(400, _validation_message(exc))

    @app.exception_handler(HttpError)
    async def _http_error(request, exc: HttpError):
        return error_response(exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        if isinstance(exc, CLIENT_ERRORS):
            return error_response(400, str(exc))
        log.exception("internal error")
        return error_response(500, f"internal error ({type(exc).__name__}); the request was not completed",
                              "server_error")

    app.add_middleware(_Guard, api_key=options.api_key, max_body=options.max_body_bytes)

    @app.get("/health")
    async def health():
        e = service.engine
        body = {"status": "draining" if service.draining else "ok", "model": options.model_name, "slots": e.slots,
                "active_slots": e.active_slots, "queue_depth": e.queue_depth}
        return JSONResponse(body, 503 if service.draining else 200)

    @app.get("/metrics")
    async def metrics():
        data, ctype = service.metrics.render()
        return Response(data, media_type=ctype)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": options.model_name, "object": "model", "created": 0,
                                            "owned_by": "spiritlm-jax"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest):
        return await _completions(service, body, http)

    @app.post("/v1/audio/speech")
    async def speech(body: SpeechRequest, http: HttpRequest):
        return await _speech(service, body, http)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(http: HttpRequest):
        return await _transcriptions(service, http)

    @app.post("/v1/spiritlm/generate")
    async def generate(body: GenerateRequest, http: HttpRequest):
        return await _generate(service, body, http)

    return app


def _lifespan(service: Service):
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.engine.start()
        try:
            yield
        finally:  # uvicorn has stopped accepting and waited for open requests (SIGTERM drains)
            service.draining = True
            await anyio.to_thread.run_sync(service.engine.stop)

    return lifespan


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        kind = err.get("type", "")
        if kind == "json_invalid":
            parts.append(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', err.get('msg'))}); "
                         f"send a JSON object with Content-Type: application/json")
        elif kind == "extra_forbidden":
            parts.append(f"unknown field {where!r}; see the endpoint's fields in the README (serve section)")
        elif kind == "missing":
            parts.append(f"field {where!r} is required")
        else:
            parts.append(f"field {where!r}: {err.get('msg')} (got {err.get('input')!r})")
    return "; ".join(parts) or "invalid request"


class _Guard:
    """ASGI middleware: bearer auth and the request-body size limit (Content-Length or counted)."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, int(max_body)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and scope.get("path") != "/health":
            auth = headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                msg = ("missing API key: send the header 'Authorization: Bearer <key>'" if not auth
                       else "wrong API key")
                return await error_response(401, msg, "authentication_error")(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await self._too_large(scope, receive, send, int(length))
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body:
                    raise _BodyTooLarge(seen)
            return msg

        try:
            await self.app(scope, counted, send)
        except _BodyTooLarge as e:
            await self._too_large(scope, receive, send, e.args[0])

    async def _too_large(self, scope, receive, send, n: int):
        resp = error_response(413, f"the request body has {n} bytes, over this server's limit of {self.max_body} "
                                   f"(--max-body-mb)", "request_too_large")
        await resp(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


# ------------------------------------------------------------------------------------------ completions
def _sampling(temperature: float, top_k: int, top_p: float, repetition_penalty: float) -> SamplingConfig:
    """OpenAI's sampling fields → the offline options (temperature 0 = greedy); a bad value raises
    GenerationError (a 400 with the CLI's message)."""
    return SamplingConfig(do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
                          top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)


def _check_neutral(body: CompletionRequest) -> None:
    for name, neutral, hint in (("presence_penalty", 0.0, "use repetition_penalty (HF's)"),
                                ("frequency_penalty", 0.0, "use repetition_penalty (HF's)"),
                                ("best_of", None, "use n"), ("logit_bias", None, "use output_modality"),
                                ("suffix", None, "Spirit LM has no infilling")):
        v = getattr(body, name)
        if v is not None and v != neutral and not (name == "best_of" and v == 1):
            raise HttpError(400, f"{name}={v!r} is not supported; {hint}", param=name)


def _prompt_ids(service: Service, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [service.tok.encode(prompt)]
    if not prompt:
        raise HttpError(400, "prompt is an empty list; give a string, a list of strings or a list of token ids",
                        param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [service.tok.encode(p) for p in prompt]


async def _completions(service: Service, body: CompletionRequest, http: HttpRequest):
    service.check_model(body.model)
    _check_neutral(body)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4:
        raise HttpError(400, f"at most 4 stop sequences, got {len(stops)}", param="stop")
    prompts = _prompt_ids(service, body.prompt)
    banned = service.banned(prompting.to_output_modality(body.output_modality))
    seed = _seed(body.seed)
    jobs, streams = [], []
    for p in prompts:
        for k in range(body.n):
            sampling = _sampling(body.temperature, body.top_k, body.top_p, body.repetition_penalty)
            jobs.append(service.make_request(p, body.max_tokens, sampling, banned, (seed + k) % 2 ** 32))
            streams.append(TextStream(service.tok, p, stops))
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    events = service.events(jobs, http)
    first = await _first_event(events)  # errors in checks surface here, before any response starts
    logs = [_LogprobLog(service.tok) if body.logprobs is not None else None for _ in jobs]

    def on_token(i, tok_id, lp, top_ids, top_lp) -> str:
        offset = len(streams[i].text)
        delta = streams[i].push(tok_id)
        if logs[i] is not None and tok_id != service.engine.eos_id:
            logs[i].add(tok_id, lp, top_ids, top_lp, body.logprobs, offset)
        if streams[i].stopped:
            jobs[i].stop()
        return delta

    def reason(i, r):
        return "stop" if streams[i].stopped or r == "stop" else ("length" if r == "length" else r)

    echo = [service.tok.decode(p) if body.echo else "" for p in prompts for _ in range(body.n)]
    if body.stream:
        async def sse():
            for i in range(len(jobs)):
                if echo[i]:
                    yield _sse(_chunk(cid, created, body.model, i, echo[i], None, None))
            async for ev in _chain(first, events):
                i = ev[0]
                if ev[1] == "token":
                    if streams[i].stopped:
                        continue
                    d = on_token(i, *ev[2:])
                    if d:
                        yield _sse(_chunk(cid, created, body.model, i, d, None, logs[i] and logs[i].last()))
                else:
                    tail = streams[i].flush()
                    yield _sse(_chunk(cid, created, body.model, i, tail, reason(i, ev[2]), None))
            if (body.stream_options or {}).get("include_usage"):
                yield _sse({"id": cid, "object": "text_completion", "created": created, "model": body.model,
                            "choices": [], "usage": _usage(prompts, body.n, jobs)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")
    reasons: dict[int, str] = {}
    async for ev in _chain(first, events):
        if ev[1] == "token":
            if not streams[ev[0]].stopped:
                on_token(ev[0], *ev[2:])
        else:
            streams[ev[0]].flush()
            reasons[ev[0]] = reason(ev[0], ev[2])
            if ev[2] == "error":
                raise HttpError(500, f"generation failed: {ev[3]}", "server_error")
    choices = [{"index": i, "text": echo[i] + s.text, "finish_reason": reasons[i],
                "logprobs": logs[i].to_json() if logs[i] is not None else None} for i, s in enumerate(streams)]
    return {"id": cid, "object": "text_completion", "created": created, "model": body.model, "choices": choices,
            "usage": _usage(prompts, body.n, jobs)}


async def _first_event(events):
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None


async def _chain(first, events):
    if first is not None:
        yield first
    async for ev in events:
        yield ev


def _usage(prompts, n, jobs) -> dict:
    p = sum(len(x) for x in prompts) * n
    c = sum(j.n_generated for j in jobs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _chunk(cid, created, model, index, text, finish, logprobs) -> dict:
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}]}


def _sse(obj) -> str:
    import json

    return f"data: {json.dumps(obj)}\n\n"


class _LogprobLog:
    """OpenAI's legacy completions logprobs object, filled token by token."""

    def __init__(self, tok):
        self.tok = tok
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []

    def _piece(self, i: int) -> str:
        return self.tok.pieces[i].replace("\u2581", " ") if 0 <= i < len(self.tok.pieces) else ""

    def add(self, tok_id, lp, top_ids, top_lp, k: int, offset: int) -> None:
        self.tokens.append(self._piece(tok_id))
        self.token_logprobs.append(float(lp))
        self.top_logprobs.append({self._piece(int(t)): float(v) for t, v in list(zip(top_ids, top_lp))[:k]})
        self.text_offset.append(offset)

    def last(self) -> dict:
        return {"tokens": self.tokens[-1:], "token_logprobs": self.token_logprobs[-1:],
                "top_logprobs": self.top_logprobs[-1:], "text_offset": self.text_offset[-1:]}

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}


# ------------------------------------------------------------------------------------------ speech out
async def _speech(service: Service, body: SpeechRequest, http: HttpRequest):
    service.check_model(body.model)
    st = service.speech_tokenizer()
    if body.response_format not in ("wav", "pcm"):
        raise HttpError(400, f"response_format {body.response_format!r} is not supported; use 'wav' or 'pcm' "
                             f"(16-bit little-endian mono at 16 kHz)", param="response_format")
    if body.speed != 1.0:
        raise HttpError(400, f"speed={body.speed} is not supported (the vocoder's durations are predicted); use 1.0",
                        param="speed")
    if body.stream_format not in (None, "audio"):
        raise HttpError(400, f"stream_format {body.stream_format!r} is not supported; audio is always streamed as "
                             f"chunked bytes ('audio')", param="stream_format")
    if body.instructions:
        raise HttpError(400, "instructions are not supported by Spirit LM", param="instructions")
    speaker = service.voice_id(body.voice)
    prompt = service.options.tts_template.replace("{text}", body.input)
    ids = service.tok.encode(prompt)
    sampling = _sampling(body.temperature, body.top_k, body.top_p, 1.0)
    job = service.make_request(ids, body.max_tokens or service.default_max_tokens(ids, service.options.tts_max_tokens),
                               sampling,
                               service.banned(OutputModality.SPEECH, for_speech_out=True), _seed(body.seed))
    sv = StreamingVocoder(st.vocoder, st.expressive, speaker_id=speaker, chunk_frames=service.options.audio_chunk_frames)
    events = service.events([job], http)
    first = await _first_event(events)

    async def audio():
        yield wav_header(SAMPLE_RATE) if body.response_format == "wav" else b""
        async for block in _speech_blocks(service, sv, _chain(first, events), job):
            yield pcm16(block)

    media = "audio/wav" if body.response_format == "wav" else "audio/pcm"
    return StreamingResponse(audio(), media_type=media, headers={"X-Sample-Rate": str(SAMPLE_RATE)})


async def _speech_blocks(service: Service, sv: StreamingVocoder, events, job: Request, every: int = 4):
    """Feed unit tokens to the streaming vocoder; yield waveform blocks as they become final."""
    new_units = 0
    async for ev in events:
        if ev[1] == "token":
            kind = unit_kind(service.vocab, ev[2])
            if kind is None:
                continue
            sv.add(*kind)
            new_units += kind[0] == "hu"
            if new_units >= every:
                new_units = 0
                for block in await service.to_thread(sv.ready):
                    service.metrics.first_audio(job)
                    yield block
        elif ev[2] == "error":
            raise HttpError(500, f"generation failed: {ev[3]}", "server_error")
    if sv.stream.hubert:
        for block in await service.to_thread(sv.finish):
            service.metrics.first_audio(job)
            yield block


# ------------------------------------------------------------------------------------------ speech in
TRANSCRIPTION_FIELDS = {"file", "model", "prompt", "response_format", "temperature", "language", "max_tokens"}


async def _transcriptions(service: Service, http: HttpRequest):
    st = service.speech_tokenizer()
    ctype = http.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise HttpError(400, f"send the audio as multipart/form-data with a 'file' field (got Content-Type "
                             f"{ctype or 'none'!r})")
    try:
        form = await http.form()
    except _BodyTooLarge:
        raise
    except Exception as e:
        raise HttpError(400, f"the multipart body cannot be parsed ({e})") from None
    unknown = sorted(set(form.keys()) - TRANSCRIPTION_FIELDS)
    if unknown:
        raise HttpError(400, f"unknown field(s) {unknown}; accepted: {sorted(TRANSCRIPTION_FIELDS)}")
    if "model" not in form:
        raise HttpError(400, "field 'model' is required", param="model")
    service.check_model(str(form["model"]))
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise HttpError(400, "field 'file' is required and must be an uploaded audio file", param="file")
    fmt = str(form.get("response_format", "json"))
    if fmt not in ("json", "text"):
        raise HttpError(400, f"response_format {fmt!r} is not supported; use 'json' or 'text'", param="response_format")
    temperature = _form_number(form, "temperature", float, 0.0, minimum=0.0)
    max_tokens = _form_number(form, "max_tokens", int, None, minimum=1)
    wav = service.load_audio(await upload.read(), "file")
    units = await service.to_thread(st.encode_string, wav)
    prompt_ids = service.tok.encode(service.options.asr_template.replace("{units}", units))
    if max_tokens is None:
        max_tokens = service.default_max_tokens(prompt_ids, service.options.asr_max_tokens)
    job = service.make_request(prompt_ids, max_tokens, _sampling(temperature, 50, 1.0, 1.0),
                               service.banned(OutputModality.TEXT), _seed(None))
    stream = TextStream(service.tok, prompt_ids, ["\n"])
    async for ev in service.events([job], http):
        if ev[1] == "token" and not stream.stopped:
            stream.push(ev[2])
            if stream.stopped:
                job.stop()
        elif ev[1] == "finish" and ev[2] == "error":
            raise HttpError(500, f"transcription failed: {ev[3]}", "server_error")
    text = stream.text.lstrip(" ").split("\n")[0].strip()  # as the eval harness's ASR
    if fmt == "text":
        return Response(text, media_type="text/plain")
    return {"text": text}


def _form_number(form, name, kind, default, minimum):
    if name not in form:
        return default
    try:
        v = kind(str(form[name]))
    except ValueError:
        raise HttpError(400, f"field {name!r} must be a{'n integer' if kind is int else ' number'}, got "
                             f"{str(form[name])!r}", param=name) from None
    if not np.isfinite(v) or v < minimum:
        raise HttpError(400, f"field {name!r} must be ≥ {minimum}, got {v}", param=name)
    return v


# ------------------------------------------------------------------------------------------ native API
async def _generate(service: Service, body: GenerateRequest, http: HttpRequest):
    service.check_model(body.model)
    if (body.inputs is None) == (body.prompt is None):
        raise HttpError(400, "give exactly one of 'inputs' (interleaved text/speech items) or 'prompt' (a ready "
                             "token string)")
    modality = prompting.to_output_modality(body.output_modality)
    if body.prompt is not None:
        prompt = body.prompt
    else:
        items = []
        for k, it in enumerate(body.inputs):
            items.append(await _input_item(service, it, k))
        if not items:
            raise HttpError(400, "inputs is empty; give at least one text or speech item", param="inputs")
        prompt = prompting.build_prompt(items, modality, encode_speech=lambda s: s)
    speaker = (service.voice_id(body.voice) if body.voice is not None
               else (service.voice_id(body.speaker_id) if body.speaker_id is not None else 2))
    ids = service.tok.encode(prompt)
    sampling = SamplingConfig(do_sample=body.do_sample, temperature=body.temperature, top_k=body.top_k,
                              top_p=body.top_p, repetition_penalty=body.repetition_penalty)
    # exactly the offline ban list (SpiritLM.generate), so greedy output equals offline generate
    banned = service.lm._banned(modality, body.force_tokens_to_output_modality)
    job = service.make_request(ids, body.max_new_tokens, sampling, banned, _seed(body.seed))
    events = service.events([job], http)
    first = await _first_event(events)
    if body.stream:
        return StreamingResponse(_generate_stream(service, body, _chain(first, events), job, speaker),
                                 media_type="text/event-stream")
    new: list[int] = []
    async for ev in _chain(first, events):
        if ev[1] == "token":
            new.append(int(ev[2]))
        elif ev[2] == "error":
            raise HttpError(500, f"generation failed: {ev[3]}", "server_error")
    full = service.tok.decode(ids + new)

    def decode_speech(s):
        return service.speech_tokenizer().decode(s, speaker_id=speaker)

    outs = await service.to_thread(prompting.decode_generated_output, full, prompt, modality, decode_speech)
    return {"object": "spiritlm.generation", "model": body.model, "prompt": prompt, "token_ids": new,
            "finish_reason": job.finish_reason, "usage": {"prompt_tokens": len(ids), "completion_tokens": len(new)},
            "outputs": [_output_json(o, body.audio_format) for o in outs]}


async def _input_item(service: Service, it, k: int):
    where = f"inputs.{k}"
    if it.type == "text":
        if it.text is None or it.audio is not None or it.units is not None:
            raise HttpError(400, f"{where}: a text item needs 'text' (and no 'audio'/'units')", param=where)
        return ("text", it.text)
    if (it.audio is None) == (it.units is None) or it.text is not None:
        raise HttpError(400, f"{where}: a speech item needs exactly one of 'audio' (base64 audio file) or 'units' "
                             f"(a unit string)", param=where)
    if it.units is not None:
        if "[Hu" not in it.units:
            raise HttpError(400, f"{where}: units {it.units[:40]!r} has no [HuN] token", param=where)
        return ("speech", it.units)
    try:
        data = base64.b64decode(it.audio, validate=True)
    except ValueError:
        raise HttpError(400, f"{where}.audio is not valid base64", param=where) from None
    wav = service.load_audio(data, f"{where}.audio")
    return ("speech", await service.to_thread(service.speech_tokenizer().encode_string, wav))


def _audio_b64(wav: np.ndarray, fmt: str) -> str:
    data = wav_header(SAMPLE_RATE, wav.size) + pcm16(wav) if fmt == "wav" else np.asarray(wav, "<f4").tobytes()
    return base64.b64encode(data).decode()


def _output_json(o, fmt: str) -> dict:
    if o.content_type is prompting.ContentType.TEXT:
        return {"type": "text", "text": o.content}
    return {"type": "speech", "audio": _audio_b64(o.content, fmt), "audio_format": fmt, "sample_rate": SAMPLE_RATE,
            "samples": int(o.content.size)}


async def _generate_stream(service: Service, body: GenerateRequest, events, job: Request, speaker: int):
    """SSE events: {"type": "text", "delta"}, {"type": "audio", "audio", ...} per block of each speech run,
    then {"type": "done", ...}. Speech runs are vocoded as they grow (the 25-unit filter and the prompt-ratio
    trimming of the non-streamed ARBITRARY output need the whole output and do not apply here)."""
    st = service.lm.speech_tokenizer
    vocab = service.vocab
    markers = {vocab.text_marker, vocab.speech_marker}
    text_ids: list[int] = []
    text = TextStream(service.tok, [], [])
    sv = None
    n_new = 0

    async def flush_speech():
        nonlocal sv
        blocks = await service.to_thread(sv.finish) if sv is not None and sv.stream.hubert else []
        sv = None
        return blocks

    def audio_event(block):
        service.metrics.first_audio(job)
        return _sse({"type": "audio", "audio": _audio_b64_raw(block, body.audio_format),
                     "audio_format": "pcm_s16le" if body.audio_format == "wav" else "f32le",
                     "sample_rate": SAMPLE_RATE})

    async for ev in events:
        if ev[1] == "finish":
            if ev[2] == "error":
                yield _sse({"type": "error", "message": f"generation failed: {ev[3]}"})
            continue
        tok_id = int(ev[2])
        kind = unit_kind(vocab, tok_id)
        if kind is not None and st is not None:
            if text_ids:
                tail = text.flush()
                if tail:
                    yield _sse({"type": "text", "delta": tail})
                text_ids, text = [], TextStream(service.tok, [], [])
            if sv is None:
                sv = StreamingVocoder(st.vocoder, st.expressive, speaker_id=speaker,
                                      chunk_frames=service.options.audio_chunk_frames)
            sv.add(*kind)
            n_new += kind[0] == "hu"
            if n_new >= 4:
                n_new = 0
                for block in await service.to_thread(sv.ready):
                    yield audio_event(block)
            continue
        if tok_id in markers or tok_id == service.engine.eos_id:
            continue
        for block in await flush_speech():
            yield audio_event(block)
        text_ids.append(tok_id)
        d = text.push(tok_id)
        if d:
            yield _sse({"type": "text", "delta": d})
    tail = text.flush()
    if tail:
        yield _sse({"type": "text", "delta": tail})
    for block in await flush_speech():
        yield audio_event(block)
    yield _sse({"type": "done", "finish_reason": job.finish_reason, "token_ids_count": job.n_generated})
    yield "data: [DONE]\n\n"


def _audio_b64_raw(wav: np.ndarray, fmt: str) -> str:
    return base64.b64encode(pcm16(wav) if fmt == "wav" else np.asarray(wav, "<f4").tobytes()).decode()


__all__ = ["build_app", "Service", "ServeOptions", "HttpError", "TextStream"]
