"""Generate text and/or speech from interleaved speech and text inputs (the original's Spiritlm.generate).

Inputs keep their command-line order: --speech FILE and --text STRING may be repeated and mixed, e.g.
  spiritlm-jax generate --speech question.wav --text " The answer is" --output-modality arbitrary
  spiritlm-jax generate --text "Once upon a time" --output-modality speech --out out/ --max-new-tokens 200
  spiritlm-jax generate --prompt "[Text]The weather[Speech]" --output-modality speech
Text outputs are printed; speech outputs are written as 16 kHz WAVs to --out (default ./spiritlm-out).

Model: --model is a variant name (spirit-lm-base-7b, spirit-lm-expressive-7b) resolved under --checkpoints
/ $SPIRITLM_CHECKPOINTS_DIR (the original layout), or a folder (an original HF LM folder or one written by
'spiritlm-jax convert'). Greedy by default, as HF's GenerationConfig; --do-sample enables sampling (top-k 50
applies unless --top-k 0).

Several processes (one per host, or several on one machine): --distributed calls jax.distributed.initialize
(TPU pods and SLURM are detected; else JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) and
shards the LM over ALL processes' devices (--mesh DATA,FSDP,TENSOR; default 1,-1,1: every weight split
over all devices), e.g. on two hosts:
  JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=<0|1> \
    spiritlm-jax generate --distributed --text "Once upon a time" --output-modality text
Every process runs the same command with the same inputs and seed; process 0 prints and writes the
outputs. A process that dies stops the others within --distributed-timeout-s (exit 5, naming it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


class _Ordered(argparse.Action):
    def __call__(self, parser, ns, value, option_string=None):
        items = getattr(ns, "inputs", None) or []
        items.append(("speech" if option_string == "--speech" else "text", value))
        ns.inputs = items


def add_arguments(p):
    p.add_argument("--speech", action=_Ordered, metavar="FILE", help="a speech input (repeatable, ordered)")
    p.add_argument("--text", action=_Ordered, metavar="STRING", help="a text input (repeatable, ordered)")
    p.add_argument("--prompt", default=None, help="a ready token string (instead of --speech/--text)")
    p.add_argument("--output-modality", choices=("text", "speech", "arbitrary"), default="arbitrary")
    p.add_argument("--model", default="spirit-lm-base-7b", help="variant name or model folder")
    p.add_argument("--checkpoints", default=None, help="original checkpoints/ folder (default: $SPIRITLM_CHECKPOINTS_DIR)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default: float32 on CPU, bfloat16 on accelerators)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speaker-id", type=int, default=2)
    p.add_argument("--no-force-modality", action="store_true",
                   help="do not ban the other modality's tokens (the original's force_tokens_to_output_modality=False)")
    p.add_argument("--out", default="spiritlm-out", help="folder for speech outputs")
    p.add_argument("--distributed", action="store_true",
                   help="run as one process of several (jax.distributed.initialize); the LM is sharded over all of them")
    p.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                   help="device mesh for the LM, e.g. 1,8,1 (-1 = the rest; default: unsharded, or 1,-1,1 with --distributed)")
    p.add_argument("--distributed-timeout-s", type=float, default=60.0, metavar="S",
                   help="with --distributed: stop when a peer process has been silent this long (default 60)")
    p.set_defaults(inputs=None)


def run(args) -> int:
    import soundfile as sf

    from spiritlm_jax.infer.engine import GenerationError
    from spiritlm_jax.outputs import OutputPathError, check_output_dir
    from spiritlm_jax.prompting import PromptError
    from spiritlm_jax.spiritlm import SpiritLM

    if not args.inputs and args.prompt is None:
        print("error: give inputs with --speech/--text or a --prompt", file=sys.stderr)
        return 2
    try:
        if args.output_modality != "text":  # speech may come out: --out must be usable before the model loads
            check_output_dir(args.out, "--out")
    except OutputPathError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        mesh = _mesh(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # text in, text out (modality forced): no speech token can be read or written, so no speech models load
    text_only = args.output_modality == "text" and not args.no_force_modality and (
        args.prompt is None and all(kind == "text" for kind, _ in args.inputs))
    try:
        lm = SpiritLM.from_pretrained(args.model, checkpoints=args.checkpoints, dtype=args.dtype, mesh=mesh,
                                      with_speech=not text_only)
        outs, prompt = lm.generate(
            interleaved_inputs=args.inputs if args.prompt is None else None, prompt=args.prompt,
            output_modality=args.output_modality, force_tokens_to_output_modality=not args.no_force_modality,
            speaker_id=args.speaker_id, seed=args.seed, return_prompt=True, max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    except (FileNotFoundError, ValueError, PromptError, GenerationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception:
        if args.distributed:  # a collective that failed because a peer died: say THAT (exit 5)
            from spiritlm_jax import distributed

            distributed.exit_if_a_peer_was_lost()
        raise
    if args.distributed:
        from spiritlm_jax import distributed

        distributed.finish()
    if not _writes_outputs():
        return 0  # every process computed the same rows (gathered); process 0 reports them
    out = Path(args.out)
    n_wav = 0
    print(f"prompt: {prompt[:200]}{'…' if len(prompt) > 200 else ''}", file=sys.stderr)
    for i, o in enumerate(outs):
        if o.content_type.value == "TEXT":
            print(f"[{i}] text: {o.content}")
        else:
            out.mkdir(parents=True, exist_ok=True)
            f = out / f"output_{i}.wav"
            sf.write(f, o.content, 16000)
            n_wav += 1
            print(f"[{i}] speech: {len(o.content) / 16000:.2f} s -> {f}")
    if not outs:
        print("(no output: the model produced nothing that survived the original's output filters)")
    return 0


def _mesh(args):
    """The LM's mesh: none (this process's default device), or --mesh over every process's devices."""
    from spiritlm_jax.distributed import TIMEOUT_RANGE_S

    low, high = TIMEOUT_RANGE_S
    if not low <= args.distributed_timeout_s <= high:  # also refuses nan and inf
        raise ValueError(f"--distributed-timeout-s must be in [{low}, {high}] seconds, got {args.distributed_timeout_s}")
    spec = args.mesh or ("1,-1,1" if args.distributed else None)
    shape = None
    if spec is not None:
        try:
            shape = tuple(int(x) for x in spec.split(","))
        except ValueError:
            raise ValueError(f"--mesh {spec!r}: give three integers DATA,FSDP,TENSOR, e.g. 1,8,1 (-1 = the rest)") from None
    if args.distributed:
        from spiritlm_jax import distributed

        distributed.initialize(args.distributed_timeout_s, hint="Generation has no state to resume: rerun it")
    if shape is None:
        return None
    import jax

    from spiritlm_jax import sharding

    mesh = sharding.make_mesh(shape)
    print(f"mesh data={mesh.shape['data']} fsdp={mesh.shape['fsdp']} tensor={mesh.shape['tensor']} over "
          f"{mesh.devices.size} devices of {jax.process_count()} process(es)", file=sys.stderr)
    return mesh


def _writes_outputs() -> bool:
    import jax

    return jax.process_index() == 0
