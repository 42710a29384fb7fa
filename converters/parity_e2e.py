"""Parity runners for Spirit LM end to end: unit strings, prompt/vocabulary logic, the wrapper's
``generate`` records and the full speech tokenizer.

Registered in ``converters/parity.py`` RUNNERS:
  units_string_pairs.{json,npz} → run_units_string   model_utils*.{json,npz} → run_model_utils
  lm_wrapper.json               → run_lm_wrapper     tokenizer_*.npz         → run_tokenizer

The models are the converted ones (the LM through ``parity_lm``, speech through ``SpeechTokenizer``);
pure logic (prompts, ids, decoded strings, parsed outputs, unit strings) is checked exactly.
"""
from __future__ import annotations

import ast
import json
import os
import random
import re
from typing import Iterable

import numpy as np

from spiritlm_jax import prompting
from spiritlm_jax import units as unit_strings
from spiritlm_jax.converters.parity import GoldenSet, Result, compare_close, compare_exact, not_implemented
from spiritlm_jax.text import TextTokenizer

_VARIANTS = {"base": "spirit-lm-base-7b", "expressive": "spirit-lm-expressive-7b"}
# Waveforms: the vocoder target (max |Δ| ≤ 1e-4 fp32); the reference's own 1-vs-2-thread spread on
# these arrays is ≤ 2.3e-6 and our vocoder measures ≤ 4e-6 on set A.
WAV_TOL = 1e-4
RECORDING = "7143-88743-0029.flac"


def _speech_tok(gs: GoldenSet, variant: str):
    """The converted Spirit LM speech tokenizer of a variant (HuBERT [+ pitch + style] + vocoder)."""
    from spiritlm_jax.speech import SpeechTokenizer

    return gs.cached(f"speech_tokenizer:{variant}", lambda: SpeechTokenizer.from_checkpoints(gs.checkpoints, variant))


def _recording(gs: GoldenSet):
    p = gs.root / "audio" / RECORDING
    return p if p.exists() else gs.inputs()["recording_wav"]


def _decode_refusals() -> tuple[type[Exception], ...]:
    """The documented errors with which we refuse a generated output the original crashed on: a bad
    prompt/output structure, a speech chunk that cannot be vocoded, a malformed unit string."""
    from spiritlm_jax.speech import SpeechDecodeError
    from spiritlm_jax.units import UnitStringError
    from spiritlm_jax.vocoder import VocoderInputError

    return prompting.PromptError, SpeechDecodeError, VocoderInputError, UnitStringError


def _raises(fn, documented: tuple[type[Exception], ...]) -> str:
    """The name of the documented error ``fn`` raised, or "" if it returned. Any other exception is a
    crash of ours and propagates (the case file then fails), so an unrelated bug cannot pass as a refusal."""
    try:
        fn()
    except documented as e:
        return type(e).__name__
    return ""


def _dumps(x) -> str:
    return json.dumps(x, sort_keys=True, ensure_ascii=False)


def _exc_name(e: BaseException, expected: str) -> str:
    """The original's exception name if ours is an instance of that builtin, else our own class name."""
    import builtins

    ref_cls = getattr(builtins, expected, None)
    if isinstance(ref_cls, type) and isinstance(e, ref_cls):
        return expected
    return type(e).__name__


# ==================================================================================== units <-> string
def _run_pair(fn: str, inp, kwargs: dict):
    if fn == "units_to_string":
        return unit_strings.units_to_string(inp, **kwargs)
    if fn == "string_to_units":
        return unit_strings.string_to_units(inp, **kwargs)
    fmt = {"spiritlm_base()": unit_strings.BASE_FORMAT, "spiritlm_expressive()": unit_strings.EXPRESSIVE_FORMAT}[fn.split(".")[0]]
    return getattr(fmt, fn.split(".")[1])(inp, **kwargs)


def _uses_style_fallback(fn: str, inp) -> bool:
    """string_to_units draws the style from `random` when pitch tokens exist but no style token."""
    if not (fn == "string_to_units" or fn.endswith(".string2units")) or not isinstance(inp, str):
        return False
    has = lambda h: any(p.startswith(h) and len(p) > 2 and p[2].isdigit() for p in inp.split("["))  # noqa: E731
    return has("Pi") and not has("St")


def run_units_string(gs: GoldenSet, case: str) -> Iterable[Result]:
    if case.endswith(".json"):
        data = gs.json(case)
        pairs = data["pairs"]
        seeds = {i: p.get("random_seed_before_call") for i, p in enumerate(pairs)}
    else:
        z = gs.npz(case)
        pairs = [
            {"fn": str(z["fn"][i]), "input": json.loads(str(z["input_json"][i])),
             "kwargs": json.loads(str(z["kwargs_json"][i])), "output": json.loads(str(z["output_json"][i])),
             "error": str(z["error"][i])}
            for i in range(len(z["fn"]))
        ]
        # The npz does not store the seeds; take them from the json twin (same pairs) when present.
        seeds = {}
        try:
            twin = gs.json(case.replace(".npz", ".json"))["pairs"]
        except FileNotFoundError:
            twin = []
        for i, p in enumerate(pairs):
            for q in twin:
                if (q["fn"], _dumps(q["input"]), _dumps(q["kwargs"])) == (p["fn"], _dumps(p["input"]), _dumps(p["kwargs"])):
                    seeds[i] = q.get("random_seed_before_call")
                    break
        data = None
    groups: dict[str, tuple[list[str], list[str]]] = {}
    unseeded = 0
    for i, p in enumerate(pairs):
        fn, err = p["fn"], p.get("error") or ""
        seed = seeds.get(i)
        fallback = _uses_style_fallback(fn, p["input"])
        state = random.getstate()
        try:
            if seed is not None:
                random.seed(seed)
            try:
                got = _dumps(_run_pair(fn, p["input"], p["kwargs"]))
            except Exception as e:  # the original raised on some inputs: we must raise the same kind
                ref_name = err.split(":")[0] if err else "no error"
                got = f"raises {_exc_name(e, ref_name)}"
        finally:
            random.setstate(state)
        ref = f"raises {err.split(':')[0]}" if err else _dumps(p["output"])
        if fallback and seed is None and isinstance(p["output"], dict):
            # Unseeded random style: accept any of the original's choices, everything else exact.
            unseeded += 1
            ref_st = p["output"].get("style", "").split()
            try:
                got_d = json.loads(got)
                got_st = got_d.get("style", "").split()
                if len(got_st) == len(ref_st) and len(set(ref_st + got_st)) <= 2 and \
                        set(ref_st + got_st) <= {str(s) for s in unit_strings.MOST_COMMON_STYLES}:
                    got_d["style"] = p["output"]["style"]
                got = _dumps(got_d)
            except (json.JSONDecodeError, AttributeError):
                pass
        g = groups.setdefault(fn, ([], []))
        g[0].append(got)
        g[1].append(ref)
    for fn, (got, ref) in groups.items():
        q = f"{fn} ({len(ref)} pairs)"
        if fn.endswith("string_to_units") and unseeded:
            q += f" [{unseeded} unseeded random styles checked up to the choice]"
        yield compare_exact(case, q, np.array(got), np.array(ref))
    if data is not None and "MOST_COMMON_STYLES" in data:
        yield compare_exact(case, "MOST_COMMON_STYLES", np.array(unit_strings.MOST_COMMON_STYLES),
                            np.array(data["MOST_COMMON_STYLES"]))
    if data is not None and "style_fallback_seed0to7" in data:
        got = []
        state = random.getstate()
        try:
            for s in range(len(data["style_fallback_seed0to7"])):
                random.seed(s)
                got.append(str(unit_strings.string_to_units("[Pi1][Hu1]")["style"]))
        finally:
            random.setstate(state)
        yield compare_exact(case, "style_fallback_seed0to7", np.array(got), np.array(data["style_fallback_seed0to7"]))


# ==================================================================================== model utils
def run_model_utils(gs: GoldenSet, case: str) -> Iterable[Result]:
    if case.endswith(".npz"):
        z = gs.npz(case)
        for key in sorted(z):
            got = np.asarray(prompting.get_forbidden_tokens(**json.loads(key)), dtype=np.int64)
            yield compare_exact(case, f"get_forbidden_tokens({key})", got, z[key])
        return
    data = gs.json(case)
    rows = data["string_predicates"]
    for fn in ("does_start_with_speech_token", "does_end_with_speech_token", "find_prompt_last_speech_start_position"):
        f = getattr(prompting, fn)
        got = np.array([_dumps(f(r["input"])) for r in rows])
        ref = np.array([_dumps(r[fn]) for r in rows])
        yield compare_exact(case, f"{fn} ({len(rows)} strings)", got, ref)
    for key, summ in sorted(data.get("get_forbidden_tokens", {}).items()):
        ids = prompting.get_forbidden_tokens(**json.loads(key))
        got = {"len": len(ids), "min": min(ids) if ids else None, "max": max(ids) if ids else None}
        ref = {k: summ[k] for k in ("len", "min", "max")}
        if summ.get("contiguous_ranges") is not None:  # null: the recorder stored no ranges for this call
            got["contiguous_ranges"], ref["contiguous_ranges"] = _ranges(ids), summ["contiguous_ranges"]
        yield compare_exact(case, f"get_forbidden_tokens({key}) {'/'.join(ref)}", _dumps(got), _dumps(ref))


def _ranges(ids) -> list[list[int]]:
    """Sorted ids as [first, last] runs of consecutive values (inclusive)."""
    out: list[list[int]] = []
    for i in sorted(ids):
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


# ==================================================================================== LM wrapper
def _text_tokenizer(gs: GoldenSet, variant: str) -> TextTokenizer:
    d = gs.checkpoints / "spiritlm_model" / _VARIANTS[variant]
    return gs.cached(f"text_tokenizer:{d}", lambda: TextTokenizer.from_dir(d))


def _recorded_speech_strings(gs: GoldenSet, variant: str) -> dict[str, str]:
    """Speech strings the original's tokenizer produced for the shared inputs (tokenizer_* cases)."""
    out = {}
    files = set(gs.case_files())
    if f"tokenizer_{variant}_recording.npz" in files:
        out["<recording path>"] = str(gs.npz(f"tokenizer_{variant}_recording.npz")["string"])
    if "tokenizer_synth_odd.npz" in files:
        z = gs.npz("tokenizer_synth_odd.npz")
        out["synth_odd_wav"] = str(z["base_string" if variant == "base" else "expr_string"])
    return out


_CALL_ITEM = re.compile(r"\('(SPEECH|TEXT)',\s*(<recording path>|'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")\)"
                        r"|GenerationInput\((\w+),\s*(SPEECH|TEXT)\)")
_CALL_MOD = re.compile(r"output_modality=(?:'(\w+)'|OutputModality\.(\w+))")


def _inputs_from_call(call: str, speech: dict[str, str]):
    """The interleaved inputs of a recorded ``generate(...)`` call, or None if not derivable."""
    if "interleaved_inputs=" not in call:
        return None
    items = []
    for m in _CALL_ITEM.finditer(call):
        if m.group(1):
            kind, val = m.group(1), m.group(2)
            if kind == "SPEECH":
                if val not in speech:
                    return None
                items.append((kind, val))
            else:
                items.append((kind, ast.literal_eval(val)))
        else:
            if m.group(3) not in speech:
                return None
            items.append((m.group(4), m.group(3)))
    return items or None


def _decompose_prompt(prompt: str, speech_strings: list[str]):
    """Invert a built prompt into interleaved inputs: text verbatim, speech split into the recorded
    strings where possible. Returns (items, n_unrecorded) where n_unrecorded counts speech pieces taken
    from the prompt itself (their content is passed through unchanged by build_prompt, so the check
    still pins the marker logic), or None if the prompt does not start with a marker."""
    parts = re.split(r"(\[Text\]|\[Speech\])", prompt)
    if parts[0] != "":
        return None
    items, unrecorded = [], 0
    for k in range(1, len(parts), 2):
        marker, content = parts[k], parts[k + 1]
        if marker == "[Text]":
            if content:
                items.append(("TEXT", content))
            continue
        rest = content
        while rest:
            for s in sorted(speech_strings, key=len, reverse=True):
                if s and rest.startswith(s):
                    items.append(("SPEECH", s))
                    rest = rest[len(s):]
                    break
            else:
                items.append(("SPEECH", rest))
                unrecorded += 1
                rest = ""
    return items, unrecorded


def _outputs_summary(outs) -> list:
    return [{"type": o.content_type.value, "content": o.content} if o.content_type is prompting.ContentType.TEXT
            else {"type": "SPEECH"} for o in outs]


def _ref_outputs_summary(outs) -> list:
    return [{"type": "TEXT", "content": o["content"]} if o["type"] == "TEXT" else {"type": "SPEECH"} for o in outs]


def run_lm_wrapper(gs: GoldenSet, case: str) -> Iterable[Result]:
    data = gs.json(case)
    files = set(gs.case_files())
    for variant, d in data.items():
        if variant not in _VARIANTS:
            continue
        tok = _text_tokenizer(gs, variant)
        expressive = variant == "expressive"
        c = f"{case}:{variant}"
        yield compare_exact(c, "fixed_prompt_ids", np.array(tok.encode(d["fixed_prompt"])), np.array(d["fixed_prompt_ids"]))
        got = {m: len(prompting.forbidden_tokens_for(m, expressive, tok.vocab)) for m in d["forbidden_token_counts"]}
        yield compare_exact(c, "forbidden_token_counts", _dumps(got), _dumps(d["forbidden_token_counts"]))
        npz = gs.npz(f"lm_{variant}.npz") if f"lm_{variant}.npz" in files else {}
        for m in ("TEXT", "SPEECH", "ARBITRARY"):
            if f"forbidden_{m}" in npz:
                yield compare_exact(c, f"forbidden ids {m} (lm_{variant}.npz)",
                                    np.asarray(prompting.forbidden_tokens_for(m, expressive, tok.vocab), dtype=np.int64),
                                    npz[f"forbidden_{m}"])
        speech = _recorded_speech_strings(gs, variant)

        # ---- built prompts: ids, and the prompt rebuilt from its inputs
        for k, b in enumerate(d.get("built_prompts", [])):
            q = f"built_prompts[{k}] {b['tag']}->{b['output_modality']}"
            yield compare_exact(c, q + " input_ids", np.array(tok.encode(b["prompt"])), np.array(b["input_ids"]))
            dec = _decompose_prompt(b["prompt"], list(speech.values()))
            if dec is None:
                yield not_implemented(c, q + " prompt", "the prompt does not start with a modality marker")
                continue
            items, unrecorded = dec
            got = prompting.build_prompt(items, b["output_modality"], encode_speech=lambda s: s)
            note = f" ({unrecorded} speech input(s) not in the recorded strings, taken from the prompt)" if unrecorded else ""
            yield compare_exact(c, q + " prompt" + note, got, b["prompt"])

        # ---- parse_speech_and_text
        ps = d.get("parse_speech_and_text", [])
        if ps:
            got = np.array([_dumps([list(x) for x in prompting.parse_speech_and_text(p["input"])]) for p in ps])
            ref = np.array([_dumps(p["output"]) for p in ps])
            yield compare_exact(c, f"parse_speech_and_text ({len(ps)} strings)", got, ref)

        # ---- generate() calls: prompt, decoded text, parsed outputs
        for w in d.get("wrapper_generate", []):
            tag = w["tag"]
            q = f"generate {tag}"
            mod = _CALL_MOD.search(w["call"])
            modality = (mod.group(1) or mod.group(2)) if mod else "ARBITRARY"
            if "prompt=<fixed_prompt>" in w["call"]:
                prompt = d["fixed_prompt"]
            else:
                items = _inputs_from_call(w["call"], speech)
                if items is None:
                    yield not_implemented(c, q + " prompt", "the call's inputs are not derivable from the recorded strings")
                    continue
                prompt = prompting.build_prompt(items, modality, encode_speech=speech.__getitem__)
            if "prompt" in w:
                yield compare_exact(c, q + " prompt", prompt, w["prompt"])
            yield compare_exact(c, q + " n_prompt_tokens", np.array(len(tok.encode(prompt))), np.array(w["n_prompt_tokens"]))
            all_key = f"{tag}_all_ids"
            if all_key not in npz:
                continue
            full = tok.decode(npz[all_key])
            prompt_ids = np.array(tok.encode(prompt))
            yield compare_exact(c, q + " all_ids[:n_prompt] == encode(prompt)",
                                npz[all_key][:len(prompt_ids)], prompt_ids)
            if "decoded_full" in w:
                yield compare_exact(c, q + " decoded_full = decode(all_ids)", full, w["decoded_full"])
                # the raw slice, NOT stripped (only the user-visible TEXT output is stripped)
                yield compare_exact(c, q + " generated_new_content", full[len(prompt):], w["generated_new_content"])
            decode = _speech_tok(gs, variant).decode  # the wrapper's default speaker_id=2
            if w.get("error"):
                # The original crashed while decoding this output; we must refuse it too (with a clear error).
                err = _raises(lambda: prompting.decode_generated_output(full, prompt, modality, decode),
                              _decode_refusals())
                yield compare_exact(c, q + f" refused like the original ({w['error'].split(':')[0]}; ours: {err or 'no error'})",
                                    np.array(bool(err)), np.array(True))
                continue
            outs = prompting.decode_generated_output(full, prompt, modality, decode)
            yield compare_exact(c, q + " outputs (types, texts)", _dumps(_outputs_summary(outs)),
                                _dumps(_ref_outputs_summary(w["outputs"])))
            for o, r in zip(outs, w["outputs"]):
                if r["type"] == "SPEECH" and "n_samples" in r:
                    yield compare_exact(c, q + f" {r.get('wav_key', 'speech')} n_samples", np.array(len(o.content)),
                                        np.array(r["n_samples"]))
                if r["type"] == "SPEECH" and r.get("wav_key") in npz:
                    yield compare_close(c, q + f" {r['wav_key']}", o.content, npz[r["wav_key"]], WAV_TOL)

        # ---- _decode_from_generated_output on crafted strings
        for e in d.get("decode_from_generated_output_ARBITRARY", []):
            q = f"decode_from_generated_output {e['tag']}"
            tok_s = _speech_tok(gs, variant)
            spk = int(e["speaker_id"]) if "speaker_id" in e else 2  # the wrapper's default speaker

            def decode1(x, _t=tok_s, _spk=spk):
                return _t.decode(x, speaker_id=_spk)

            full_e = e["generated_content"]  # recorded as prompt + generation, as the original was called
            if e.get("error"):
                err = _raises(lambda: prompting.decode_generated_output(full_e, e["prompt"], "ARBITRARY", decode1),
                              _decode_refusals())
                yield compare_exact(c, q + f" refused like the original ({e['error'].split(':')[0]}; ours: {err or 'no error'})",
                                    np.array(bool(err)), np.array(True))
                continue
            outs = prompting.decode_generated_output(full_e, e["prompt"], "ARBITRARY", decode1)
            yield compare_exact(c, q + " outputs (types, texts)", _dumps(_outputs_summary(outs)),
                                _dumps(_ref_outputs_summary(e["outputs"])))
            for o, r in zip(outs, e["outputs"]):
                if r["type"] == "SPEECH" and "n_samples" in r:
                    yield compare_exact(c, q + f" {r.get('wav_key', 'speech')} n_samples", np.array(len(o.content)),
                                        np.array(r["n_samples"]))
                if r["type"] == "SPEECH" and r.get("wav_key") in npz:
                    yield compare_close(c, q + f" {r['wav_key']}", o.content, npz[r["wav_key"]], WAV_TOL)


# ==================================================================================== speech tokenizer glue
def run_tokenizer(gs: GoldenSet, case: str) -> Iterable[Result]:
    """tokenizer_*.npz: the full Spirit LM speech tokenizer (encode_units / encode_string / decode)."""
    z = gs.npz(case)
    if "synth_odd" in case:
        wav = z["input_wav"] if "input_wav" in z else gs.inputs()["synth_odd_wav"]
        if "base_hubert" in z:
            yield compare_exact(case, "units2string(base_hubert) == base_string",
                                unit_strings.BASE_FORMAT.units2string({"hubert": str(z["base_hubert"])}), z["base_string"])
            tok = _speech_tok(gs, "base")
            u = tok.encode_units(wav)
            yield compare_exact(case, "base_hubert = encode_units(input_wav)", u["hubert"], z["base_hubert"])
            yield compare_exact(case, "base_string = encode_string(input_wav)", tok.units2string(u), z["base_string"])
        if "expr_hubert" in z:
            ref = {"hubert": str(z["expr_hubert"]), "pitch": str(z["expr_pitch"]), "style": str(z["expr_style"])}
            yield compare_exact(case, "units2string(expr_*) == expr_string", unit_strings.EXPRESSIVE_FORMAT.units2string(ref),
                                z["expr_string"])
            tok = _speech_tok(gs, "expressive")
            u = tok.encode_units(wav)
            for k in ("hubert", "pitch", "style"):
                yield compare_exact(case, f"expr_{k} = encode_units(input_wav)", u[k], z[f"expr_{k}"])
            yield compare_exact(case, "expr_string = encode_string(input_wav)", tok.units2string(u), z["expr_string"])
        return
    expressive = "units_pitch" in z
    variant = "expressive" if expressive else "base"
    fmt = unit_strings.EXPRESSIVE_FORMAT if expressive else unit_strings.BASE_FORMAT
    keys = ("hubert", "pitch", "style") if expressive else ("hubert",)
    for k in keys:
        if f"units_{k}_int" in z:
            yield compare_exact(case, f"units_{k}_int == units_{k}", " ".join(str(int(v)) for v in z[f"units_{k}_int"]),
                                z[f"units_{k}"])
    yield compare_exact(case, "units2string(units) == string", fmt.units2string({k: str(z[f"units_{k}"]) for k in keys}),
                        z["string"])
    back = fmt.string2units(str(z["string"]))
    for k in keys:
        if f"string2units_{k}" in z:
            yield compare_exact(case, f"string2units(string)[{k}]", back.get(k, ""), z[f"string2units_{k}"])

    # --- the models: audio -> units -> string, and string -> waveform
    tok = _speech_tok(gs, variant)
    units = tok.encode_units(_recording(gs))
    for k in keys:
        yield compare_exact(case, f"units_{k} = encode_units(recording)", units[k], z[f"units_{k}"])
    if "units_audio_key" in z:  # the input's absolute path: environment specific, so its file name is compared
        yield compare_exact(case, "units['audio'] names the input file", os.path.basename(units.get("audio", "")),
                            os.path.basename(str(z["units_audio_key"])))
    yield compare_exact(case, "string = encode_string(recording)", tok.units2string(units), z["string"])
    wav, info = tok.decode_with_details(str(z["string"]))  # speaker_id=2, dur_pred=True
    if "decode_wav" in z:
        yield compare_close(case, "decode_wav = decode(string)", wav, z["decode_wav"], WAV_TOL)
    if "decode_dur" in z:
        yield compare_exact(case, "decode_dur", np.asarray(info["dur"])[None], z["decode_dur"])
    if "decode_log_dur" in z:
        # the duration predictor's output before rounding; same fp32 bound as the vocoder's log-durations
        yield compare_close(case, "decode_log_dur", np.asarray(info["log_dur"])[None], z["decode_log_dur"], 1e-4)
    for k, key in (("code", "decode_gen_code"), ("f0_code", "decode_gen_f0_code"), ("style_code", "decode_gen_style_code")):
        if key in z:
            yield compare_exact(case, f"{key} (what the generator was fed)", np.asarray(info[k])[None], z[key])
    if "decode_spk1_nodur_wav" in z:
        yield compare_close(case, "decode_spk1_nodur_wav = decode(string, speaker_id=1, dur_pred=False)",
                            tok.decode(str(z["string"]), speaker_id=1, dur_pred=False), z["decode_spk1_nodur_wav"], WAV_TOL)
    if "decode_units_spk0_wav" in z:
        ref_units = {k: str(z[f"units_{k}"]) for k in keys}
        yield compare_close(case, "decode_units_spk0_wav = decode(encode_units(recording), speaker_id=0)",
                            tok.decode(ref_units, speaker_id=0), z["decode_units_spk0_wav"], WAV_TOL)
