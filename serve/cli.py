"""Serve Spirit LM over HTTP: OpenAI-compatible completions, speech and transcriptions, plus the native
interleaved speech+text API, with continuous batching, a prefix cache and streamed audio.

  spiritlm-jax serve --demo                                   # tiny random-weight model, 127.0.0.1:8000
  spiritlm-jax serve --checkpoints checkpoints/ --model spirit-lm-expressive-7b --slots 16 --api-key $KEY
  spiritlm-jax serve --model converted/spirit-lm-base-7b --mesh data=2,tensor=4 --shots asr_shots.jsonl

Endpoints: POST /v1/completions, /v1/audio/speech, /v1/audio/transcriptions, /v1/spiritlm/generate;
GET /v1/models, /health, /metrics (Prometheus). Binds to 127.0.0.1 unless --host says otherwise; set
--api-key (or $SPIRITLM_API_KEY) before exposing it. SIGTERM (Ctrl-C) stops accepting and lets the
requests in flight finish.

--shots FILE (JSONL, one {"text": ..., "units": "[Hu..]..."} or {"text": ..., "audio": "path.wav"} per line)
makes transcription and speech prompts few-shot (the eval harness's ASR/TTS formats; the shared prefix is
computed once and then served from the prefix cache).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def add_arguments(p) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="spirit-lm-base-7b",
                   help="variant name (spirit-lm-base-7b, spirit-lm-expressive-7b) under --checkpoints, or a model "
                        "folder (original HF LM folder or a converted one) — what SpiritLM.from_pretrained accepts")
    g.add_argument("--checkpoints", default=None,
                   help="the original checkpoints/ folder (default: $SPIRITLM_CHECKPOINTS_DIR)")
    g.add_argument("--demo", action="store_true", help="serve the tiny random-weight demo checkpoints (built once)")
    g.add_argument("--served-model-name", default=None, help="the name clients pass as 'model' (default: --model's)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default: float32 on CPU, bfloat16 on accelerators)")
    g.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                   help="shard over a mesh, e.g. data=2,tensor=4 (axes data, fsdp, tensor; default: one device)")
    g.add_argument("--no-speech", action="store_true", help="text only: do not load the speech tokenizer/vocoder")
    g = p.add_argument_group("engine")
    g.add_argument("--slots", type=int, default=8, help="concurrent decode slots (default 8)")
    g.add_argument("--max-len", type=int, default=2048, help="positions per slot: prompt + max_tokens (default 2048)")
    g.add_argument("--short-slots", type=int, default=0, metavar="N",
                   help="of the --slots, N hold only --short-len positions (default 0: every slot holds --max-len). "
                        "A request goes to the shortest free slot that holds its prompt + max_tokens, and a decode "
                        "step reads each slot's own length, so short chats beside a few long few-shot prompts cost "
                        "what they hold (135 M, 16 slots: 4 x 1,152 + 12 x 256 positions read per step instead "
                        "of 16 x 1,152; bench/RESULTS.md)")
    g.add_argument("--short-len", type=int, default=256, help="positions of a short slot (default 256)")
    g.add_argument("--prefix-cache-mb", type=float, default=256.0, help="device memory for cached prefixes (0 = off)")
    g.add_argument("--prefix-block", type=int, default=16, help="prefix-cache block size in tokens (default 16)")
    g.add_argument("--no-warmup", action="store_true", help="skip compiling the decode step before serving")
    g.add_argument("--precompile", action="store_true",
                   help="before serving, compile every prefill and decode shape the scheduler can pick (rows x "
                        "length x attention window; greedy and top-k sampling), so no request waits on a compile: "
                        "steady-state latency from the first request, at the price of a longer start (135 M, 16 "
                        "slots x 1,152 positions on 2 CPU cores: 156 programs, 7 minutes)")
    g = p.add_argument_group("speech")
    g.add_argument("--shots", default=None, help="few-shot examples for transcription/speech prompts (JSONL)")
    g.add_argument("--n-shot", type=int, default=None, help="use only the first N shots (default: all)")
    g.add_argument("--asr-template", default=None,
                   help="transcription prompt with {units} (default: the few-shot prefix + [Speech]{units}[Text])")
    g.add_argument("--tts-template", default=None,
                   help="speech prompt with {text} (default: the few-shot prefix + [Text]{text}[Speech])")
    g.add_argument("--audio-chunk-frames", type=int, default=32,
                   help="vocoder frames per streamed audio block (smaller: earlier first audio; default 32)")
    g.add_argument("--max-audio-seconds", type=float, default=120.0, help="longest accepted audio input (413 beyond)")
    g = p.add_argument_group("HTTP")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("SPIRITLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $SPIRITLM_API_KEY; none = no auth)")
    g.add_argument("--max-body-mb", type=float, default=25.0, help="largest request body (413 beyond)")
    g.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


class CliError(Exception):
    pass


def parse_mesh(spec: str | None):
    if not spec:
        return None
    from spiritlm_jax.sharding import MESH_AXES, make_mesh

    shape = {}
    for part in spec.split(","):
        name, _, n = part.partition("=")
        if name.strip() not in MESH_AXES or not n.strip().lstrip("-").isdigit():
            raise CliError(f"--mesh {spec!r}: expected AXIS=N pairs with AXIS in {list(MESH_AXES)}, e.g. data=2,tensor=4")
        shape[name.strip()] = int(n)
    try:
        return make_mesh(shape)
    except ValueError as e:
        raise CliError(f"--mesh {spec!r}: {e}") from None


def load_shots(path: str, n_shot: int | None, speech_tokenizer) -> list[tuple[str, str]]:
    """(text, unit string) pairs from a JSONL file."""
    p = Path(path)
    if not p.is_file():
        raise CliError(f"--shots {path}: file not found")
    shots = []
    for k, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CliError(f"--shots {path}, line {k}: not JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not (row.get("units") or row.get("audio")):
            raise CliError(f"--shots {path}, line {k}: expected {{\"text\": ..., \"units\": ...}} or "
                           f"{{\"text\": ..., \"audio\": PATH}}")
        units = row.get("units")
        if not units:
            if speech_tokenizer is None:
                raise CliError(f"--shots {path}, line {k}: audio shots need the speech tokenizer (drop --no-speech)")
            audio = Path(row["audio"])
            audio = audio if audio.is_absolute() else p.parent / audio
            units = speech_tokenizer.encode_string(str(audio))
        shots.append((row["text"], units))
    if not shots:
        raise CliError(f"--shots {path}: no examples in the file")
    return shots[:n_shot] if n_shot is not None else shots


def build_service(args):
    """Load the model and build the engine + service the app serves (also used by tests and the benchmark)."""
    from spiritlm_jax.spiritlm import SpiritLM

    from .app import Service, ServeOptions
    from .engine import Engine, ServeError

    if args.slots < 1:
        raise CliError(f"--slots must be ≥ 1, got {args.slots}")
    if args.max_len < 2:
        raise CliError(f"--max-len must be ≥ 2, got {args.max_len}")
    if args.audio_chunk_frames < 1:
        raise CliError(f"--audio-chunk-frames must be ≥ 1, got {args.audio_chunk_frames}")
    mesh = parse_mesh(args.mesh)
    checkpoints = args.checkpoints
    if args.demo:
        from spiritlm_jax.tiny_checkpoints import ensure_tiny_checkpoints

        checkpoints = str(ensure_tiny_checkpoints(log=lambda m: print(m, file=sys.stderr))[0])
    try:
        lm = SpiritLM.from_pretrained(args.model, checkpoints=checkpoints, dtype=args.dtype, mesh=mesh,
                                      with_speech=not args.no_speech)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise CliError(f"cannot load {args.model!r}: {e}") from None
    if mesh is not None:
        n = mesh.shape["data"] * mesh.shape["fsdp"]
        if args.slots % n:
            raise CliError(f"--slots {args.slots} must be a multiple of the mesh's batch size {n} (data × fsdp)")
        if args.short_slots % n:
            raise CliError(f"--short-slots {args.short_slots} must be a multiple of the mesh's batch size {n} "
                           f"(data × fsdp): each tier of slots is sharded over it")
    try:
        engine = Engine(lm.cfg, lm.params, slots=args.slots, max_len=args.max_len, eos_id=lm.tokenizer.vocab.eos_id,
                        mesh=mesh, prefix_block=args.prefix_block, prefix_cache_mb=args.prefix_cache_mb,
                        short_slots=args.short_slots, short_len=args.short_len)
    except ServeError as e:  # the engine's options (--short-slots, --short-len), in its words
        raise CliError(f"{e} (--slots / --max-len / --short-slots / --short-len)") from None
    name = args.served_model_name or Path(args.model).name
    options = ServeOptions(model_name=name, api_key=args.api_key or None, max_body_bytes=int(args.max_body_mb * 2 ** 20),
                           max_audio_seconds=args.max_audio_seconds, audio_chunk_frames=args.audio_chunk_frames)
    asr, tts = "[Speech]{units}[Text]", "[Text]{text}[Speech]"
    if args.shots:
        from spiritlm_jax.evaluation.tasks import asr_example, tts_example

        shots = load_shots(args.shots, args.n_shot, lm.speech_tokenizer)
        asr = "".join(asr_example(u, t.lower()) for t, u in shots) + asr
        tts = "".join(tts_example(t.lower(), u) for t, u in shots) + tts
    options.asr_template = args.asr_template or asr
    options.tts_template = args.tts_template or tts
    for flag, tpl, key in (("--asr-template", options.asr_template, "{units}"),
                           ("--tts-template", options.tts_template, "{text}")):
        if key not in tpl:
            raise CliError(f"{flag} must contain {key}, got {tpl[:80]!r}")
    if args.precompile:
        engine.precompile(log=lambda m: print(m, file=sys.stderr, flush=True), progress=True)
    elif not args.no_warmup:  # compile the decode steps and the smallest prefill before the first client waits
        engine.warm_up(lm.tokenizer.vocab.bos_id)
    return Service(lm, engine, options)


def run(args) -> int:
    import logging

    try:
        import uvicorn

        from .app import build_app
    except ImportError as e:
        print(f"error: serving needs the 'serve' extra ({e.name} is missing): pip install 'spiritlm-jax[serve]'",
              file=sys.stderr)
        return 1
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: binding to {args.host} without --api-key: anyone who can reach this port can use the model",
              file=sys.stderr)
    try:
        service = build_service(args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(service)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=60)
    server = uvicorn.Server(config)
    _exit_quietly_after_drain()
    e = service.engine
    layout = " + ".join(f"{t.slots} × {t.length}" for t in e.tiers)
    print(f"serving {service.options.model_name!r} on http://{args.host}:{args.port} ({e.slots} slots: {layout} "
          f"positions{', auth on' if args.api_key else ''})", file=sys.stderr, flush=True)
    server.run()
    return 0


def _exit_quietly_after_drain() -> None:
    """uvicorn drains on SIGTERM/SIGINT and then re-raises the signal; these handlers turn that re-raise
    into a clean exit (0 for SIGTERM, a service manager's normal stop; 130 for Ctrl-C) without a traceback."""
    import signal

    def leave(code):
        def handler(signum, frame):
            print("stopped: requests in flight were drained", file=sys.stderr, flush=True)
            raise SystemExit(code)

        return handler

    signal.signal(signal.SIGTERM, leave(0))
    signal.signal(signal.SIGINT, leave(130))
