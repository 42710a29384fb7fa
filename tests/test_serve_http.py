"""The HTTP server (serve/app.py) on 127.0.0.1, driven by the official openai client and raw HTTP: outputs
equal offline generation, streams equal their non-streamed results, every bad input gets its 4xx, auth,
and a disconnect frees its slot (seen through /metrics). The CLI entry point and SIGTERM draining run in
test_serve_cli.py."""
import base64
import io
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import soundfile as sf

from spiritlm_jax.infer.engine import SamplingConfig, generate
from spiritlm_jax.prompting import OutputModality

KEY = "test-key-123"
MODEL = "spirit-lm-base-7b"
MAX_AUDIO_S = 5.0
N = 32  # new tokens everywhere: the offline references share one compiled program per prompt bucket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    import uvicorn

    from spiritlm_jax.cli import build_parser
    from spiritlm_jax.serve.app import build_app
    from spiritlm_jax.serve.cli import build_service

    port = free_port()
    args = build_parser("serve").parse_args(
        ["serve", "--demo", "--slots", "4", "--max-len", "256", "--port", str(port), "--api-key", KEY,
         "--max-body-mb", "0.5", "--max-audio-seconds", str(MAX_AUDIO_S), "--audio-chunk-frames", "16"])
    service = build_service(args)
    srv = uvicorn.Server(uvicorn.Config(build_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            break
        except OSError:
            time.sleep(0.05)
    yield base, service
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def http(base, method, path, body=None, *, headers=None, key=KEY, raw: bytes | None = None):
    """(status, parsed JSON or bytes) for one request."""
    h = {"Content-Type": "application/json"} if raw is None else {}
    if key:
        h["Authorization"] = f"Bearer {key}"
    h.update(headers or {})
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            content = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        content, status = e.read(), e.code
    try:
        return status, json.loads(content)
    except ValueError:
        return status, content


def wav_bytes(seconds: float) -> bytes:
    from spiritlm_jax.infer.demo import synthetic_prompt

    wav = synthetic_prompt()
    wav = np.tile(wav, int(np.ceil(seconds * 16000 / wav.size)))[: int(seconds * 16000)]
    buf = io.BytesIO()
    sf.write(buf, wav, 16000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def offline_ids(service, prompt_ids, n, banned=None):
    return generate(service.lm.cfg, service.lm.params, [prompt_ids], SamplingConfig(max_new_tokens=n), banned,
                    eos_id=service.lm.tokenizer.vocab.eos_id)[0][0]


def continuation(service, prompt_ids, new_ids) -> str:
    tok = service.lm.tokenizer
    return tok.decode(prompt_ids + new_ids)[len(tok.decode(prompt_ids)):]


# ------------------------------------------------------------------------------------------ completions
def test_completions_greedy_equal_offline_streamed_or_not_and_concurrent(server, client):
    base, service = server
    prompts = ["Once upon a time", "The weather today[Speech][Hu12][Hu7][Hu99]", "A"]
    expected = []
    for p in prompts:
        ids = service.lm.tokenizer.encode(p)
        expected.append(continuation(service, ids, offline_ids(service, ids, N)))
    results = [None] * len(prompts)

    def one(i):  # concurrent clients: continuous batching must not change greedy outputs
        results[i] = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=N, temperature=0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for r, want in zip(results, expected):
        assert r.choices[0].text == want and r.choices[0].finish_reason in ("length", "stop")
        assert r.usage.completion_tokens >= 1
    stream = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=N, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected[0]
    assert chunks[-1].choices[0].finish_reason in ("length", "stop") and len(chunks) > 3


def test_completions_options(server, client):
    base, service = server
    two = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0.9, n=2, seed=7,
                                    logprobs=2)
    again = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0.9, n=2, seed=7,
                                      logprobs=2)
    assert [c.text for c in two.choices] == [c.text for c in again.choices]  # seeded sampling is reproducible
    lp = two.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) >= 1
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)
    full = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=N, temperature=0).choices[0]
    stop = full.text[3:6]
    cut = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=N, temperature=0, stop=[stop])
    assert cut.choices[0].text == full.text[:full.text.find(stop)] and cut.choices[0].finish_reason == "stop"
    text_only = client.completions.create(model=MODEL, prompt="Once", max_tokens=16, temperature=0,
                                          extra_body={"output_modality": "text"})
    assert "[Hu" not in text_only.choices[0].text
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


# ------------------------------------------------------------------------------------------ speech
def test_audio_speech_streams_the_one_shot_vocoding_of_its_units(server, client, tmp_path):
    base, service = server
    st = service.lm.speech_tokenizer
    text, n = "hello world", N
    out = tmp_path / "speech.wav"
    with client.audio.speech.with_streaming_response.create(
            model=MODEL, input=text, voice=st.vocoder.speakers[1] if st.vocoder.speakers else "1",
            response_format="wav", extra_body={"temperature": 0, "max_tokens": n}) as resp:
        resp.stream_to_file(out)
    got, sr = sf.read(out, dtype="float32")
    assert sr == 16000
    ids = service.lm.tokenizer.encode(f"[Text]{text}[Speech]")
    new = offline_ids(service, ids, n, service.banned(OutputModality.SPEECH, for_speech_out=True))
    want = st.decode(service.lm.tokenizer.decode(new), speaker_id=1)
    assert got.shape == want.shape
    # the stream carries 16-bit PCM: one-shot vocoding quantized the same way within one step
    np.testing.assert_allclose(got, np.round(np.clip(want, -1, 1) * 32767) / 32767, atol=1.5 / 32767)
    status, body = http(base, "GET", "/metrics")
    assert b"spiritlm_time_to_first_audio_seconds_count 1.0" in body or b"time_to_first_audio_seconds_count" in body


def test_audio_transcription_is_the_greedy_asr_prompt(server, client):
    base, service = server
    audio = wav_bytes(2.0)
    r = client.audio.transcriptions.create(model=MODEL, file=("clip.wav", audio), extra_body={"max_tokens": N})
    st = service.lm.speech_tokenizer
    from spiritlm_jax.audio import load_audio

    ids = service.lm.tokenizer.encode(f"[Speech]{st.encode_string(load_audio(audio))}[Text]")
    new = offline_ids(service, ids, N, service.banned(OutputModality.TEXT))
    assert r.text == continuation(service, ids, new).lstrip(" ").split("\n")[0].strip()


# ------------------------------------------------------------------------------------------ native API
def test_native_generate_equals_spiritlm_generate_and_its_stream(server):
    base, service = server
    lm = service.lm
    body = {"model": MODEL, "inputs": [{"type": "text", "text": "The weather"},
                                       {"type": "speech", "units": "[Hu12][Hu7][Hu99][Hu3]"}],
            "output_modality": "speech", "max_new_tokens": N, "audio_format": "f32"}
    status, out = http(base, "POST", "/v1/spiritlm/generate", body)
    assert status == 200, out
    # the same interleaved inputs through the offline API (a unit string is what encode_speech returns)
    prompt = "[Text]The weather[Speech][Hu12][Hu7][Hu99][Hu3]"
    assert out["prompt"] == prompt
    outs, ids = lm.generate_batch(prompts=[prompt], output_modality="speech", max_new_tokens=N, return_ids=True,
                                  seed=0)
    assert out["token_ids"] == ids[0]
    wav = np.frombuffer(base64.b64decode(out["outputs"][0]["audio"]), "<f4")
    np.testing.assert_allclose(wav, outs[0][0].content, atol=1e-6)
    body["stream"] = True
    req = urllib.request.Request(base + "/v1/spiritlm/generate", json.dumps(body).encode(),
                                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    events = []
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    blocks = [np.frombuffer(base64.b64decode(e["audio"]), "<f4") for e in events if e["type"] == "audio"]
    assert len(blocks) > 1 and events[-1]["type"] == "done"
    # streamed blocks = one-shot vocoding of the final units (the tolerance the issue sets)
    np.testing.assert_allclose(np.concatenate(blocks), wav, atol=1e-4)


# ------------------------------------------------------------------------------------------ bad input
COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 4}


@pytest.mark.parametrize("path, body, raw, status, fragment", [
    ("/v1/completions", None, b'{"model": "x", "prompt": ', 400, "not valid JSON"),
    ("/v1/completions", {**COMPLETION, "colour": "red"}, None, 400, "unknown field 'colour'"),
    ("/v1/completions", {"model": MODEL}, None, 400, "'prompt' is required"),
    ("/v1/completions", {**COMPLETION, "model": "gpt-4"}, None, 404, "not served here"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 0}, None, 400, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 2.7}, None, 400, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "temperature": -1}, None, 400, "temperature"),
    ("/v1/completions", {**COMPLETION, "top_p": 0}, None, 400, "top_p"),
    ("/v1/completions", {**COMPLETION, "presence_penalty": 0.5}, None, 400, "repetition_penalty"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 300}, None, 400, "a slot holds 256"),
    ("/v1/completions", {**COMPLETION, "prompt": [1, 99999]}, None, 400, "outside"),
    ("/v1/completions", {**COMPLETION, "prompt": []}, None, 400, "empty"),
    ("/v1/completions", {**COMPLETION, "stop": ["a", "b", "c", "d", "e"]}, None, 400, "at most 4"),
    ("/v1/audio/speech", {"model": MODEL, "input": "hi", "voice": "alloy"}, None, 400, "speakers"),
    ("/v1/audio/speech", {"model": MODEL, "input": "hi", "voice": "0", "response_format": "mp3"}, None, 400, "wav"),
    ("/v1/audio/speech", {"model": MODEL, "input": "hi", "voice": "0", "speed": 2}, None, 400, "speed"),
    ("/v1/audio/speech", {"model": MODEL, "input": "", "voice": "0"}, None, 400, "input"),
    ("/v1/spiritlm/generate", {"model": MODEL}, None, 400, "exactly one of"),
    ("/v1/spiritlm/generate", {"model": MODEL, "inputs": []}, None, 400, "empty"),
    ("/v1/spiritlm/generate", {"model": MODEL, "inputs": [{"type": "speech", "audio": "%%%"}]}, None, 400, "base64"),
    ("/v1/spiritlm/generate", {"model": MODEL, "inputs": [{"type": "speech", "audio": base64.b64encode(
        b"not audio").decode()}]}, None, 400, "not a readable audio file"),
    ("/v1/spiritlm/generate", {"model": MODEL, "inputs": [{"type": "speech", "units": "hello"}]}, None, 400, "[Hu"),
    ("/v1/spiritlm/generate", {"model": MODEL, "prompt": "x", "output_modality": "video"}, None, 400,
     "output_modality"),
])
def test_bad_json_inputs_get_their_status(server, path, body, raw, status, fragment):
    base, _ = server
    got, err = http(base, "POST", path, body, raw=raw,
                    headers={"Content-Type": "application/json"} if raw is not None else None)
    assert got == status, err
    assert fragment in err["error"]["message"], err


def test_body_over_the_limit_gets_413_before_it_is_read(server):
    """The Content-Length alone decides (the server answers without reading the body, so a raw socket sends
    the headers and only the start of the body)."""
    base, _ = server
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: 600000\r\n\r\n").encode() + b"x" * 1000)
        reply = b""
        while b"}}" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"over this server's limit" in reply


def _multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    boundary = "spiritlmtestboundary"
    out = io.BytesIO()
    for k, v in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for k, (name, data) in files.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{name}"\r\n'
                  f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize("fields, files, status, fragment", [
    ({"model": MODEL}, {}, 400, "'file' is required"),
    ({"model": MODEL}, {"file": ("a.wav", b"RIFF garbage")}, 400, "not a readable audio file"),
    ({"model": MODEL}, {"file": ("a.wav", wav_bytes(MAX_AUDIO_S + 1))}, 413, "over this server's limit"),
    ({"model": MODEL, "colour": "red"}, {"file": ("a.wav", wav_bytes(1))}, 400, "unknown field"),
    ({"model": "whisper-1"}, {"file": ("a.wav", wav_bytes(1))}, 404, "not served here"),
    ({"model": MODEL, "temperature": "hot"}, {"file": ("a.wav", wav_bytes(1))}, 400, "must be a number"),
    ({"model": MODEL, "response_format": "srt"}, {"file": ("a.wav", wav_bytes(1))}, 400, "json"),
])
def test_bad_transcription_inputs_get_their_status(server, fields, files, status, fragment):
    base, _ = server
    data, ctype = _multipart(fields, files)
    got, err = http(base, "POST", "/v1/audio/transcriptions", raw=data, headers={"Content-Type": ctype})
    assert got == status, err
    assert fragment in err["error"]["message"], err


def test_auth(server):
    base, _ = server
    assert http(base, "GET", "/v1/models", key=None)[0] == 401
    status, err = http(base, "POST", "/v1/completions", COMPLETION, key="wrong")
    assert status == 401 and err["error"]["message"] == "wrong API key"
    assert "Authorization: Bearer" in http(base, "GET", "/v1/models", key=None)[1]["error"]["message"]
    assert http(base, "GET", "/health", key=None)[0] == 200  # the liveness probe needs no key
    assert http(base, "GET", "/v1/models")[0] == 200


# ------------------------------------------------------------------------------------------ cancellation
def _metric(base, name) -> float:
    body = http(base, "GET", "/metrics")[1].decode()
    for line in body.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_client_disconnect_cancels_and_frees_the_slot(server):
    base, _ = server
    before = _metric(base, 'spiritlm_requests_total{outcome="cancelled"}') if 'outcome="cancelled"' in http(
        base, "GET", "/metrics")[1].decode() else 0.0
    port = int(base.rsplit(":", 1)[1])
    body = json.dumps({"model": MODEL, "prompt": "Once", "max_tokens": 250, "temperature": 0.8, "stream": True})
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
    got = b""
    while got.count(b"data: ") < 3:
        got += sock.recv(4096)
    assert _metric(base, "spiritlm_active_slots") == 1.0
    sock.close()
    for _ in range(400):
        if _metric(base, "spiritlm_active_slots") == 0.0:
            break
        time.sleep(0.05)
    assert _metric(base, "spiritlm_active_slots") == 0.0
    assert _metric(base, 'spiritlm_requests_total{outcome="cancelled"}') == before + 1
    assert http(base, "POST", "/v1/completions", COMPLETION)[0] == 200  # the server goes on


# ------------------------------------------------------------------------------------------ the README
def _readme_block(lang: str, marker: str) -> str:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(rf"```{lang}\n(.*?)```", text, re.S) if marker in b]
    assert len(blocks) == 1, f"expected one README {lang} block with {marker!r}, found {len(blocks)}"
    return blocks[0]


def test_readme_curl_and_openai_examples_run_as_written(server, tmp_path, monkeypatch, capsys):
    """The README's serve examples, verbatim except the port (bind(0)) and the key's placeholder value,
    against the demo server: the greedy curl completion and both transcriptions equal offline generation;
    both speech requests write a WAV."""
    import subprocess

    base, service = server
    here = "127.0.0.1:" + base.rsplit(":", 1)[1]
    curl = _readme_block("bash", "curl -s 127.0.0.1:8000")
    python = _readme_block("python", "openai.OpenAI(")
    assert curl.count("127.0.0.1:8000") == 3 and python.count("127.0.0.1:8000") == 1 and "export KEY=…" in curl
    curl = curl.replace("127.0.0.1:8000", here).replace("export KEY=…", f"export KEY={KEY}")
    (tmp_path / "question.wav").write_bytes(wav_bytes(2.0))
    tok, st = service.lm.tokenizer, service.lm.speech_tokenizer
    from spiritlm_jax.audio import load_audio

    asr_ids = tok.encode(f"[Speech]{st.encode_string(load_audio((tmp_path / 'question.wav').read_bytes()))}[Text]")
    asr_new = offline_ids(service, asr_ids, service.default_max_tokens(asr_ids, service.options.asr_max_tokens),
                          service.banned(OutputModality.TEXT))
    want_asr = continuation(service, asr_ids, asr_new).lstrip(" ").split("\n")[0].strip()

    run = subprocess.run(["bash", "-euo", "pipefail", "-c", curl], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    replies, rest = [], run.stdout.strip()
    while rest:  # the two JSON replies curl printed back to back
        obj, end = json.JSONDecoder().raw_decode(rest)
        replies.append(obj)
        rest = rest[end:].lstrip()
    assert len(replies) == 2 and "error" not in replies[0] and "error" not in replies[1], run.stdout[:500]
    ids = tok.encode("[Text]Once upon a time")
    assert replies[0]["choices"][0]["text"] == continuation(service, ids, offline_ids(service, ids, N))
    assert replies[1]["text"] == want_asr
    wav, sr = sf.read(tmp_path / "hello.wav", dtype="float32")
    assert sr == 16000 and wav.size > 0 and np.isfinite(wav).all()

    (tmp_path / "hello.wav").unlink()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KEY", KEY)
    exec(compile(python.replace("127.0.0.1:8000", here), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.endswith(want_asr + "\n") and len(printed) > len(want_asr) + 1  # the streamed story, then the text
    wav, sr = sf.read(tmp_path / "hello.wav", dtype="float32")
    assert sr == 16000 and wav.size > 0 and np.isfinite(wav).all()
