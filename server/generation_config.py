"""The sampling defaults a request gets for the fields it leaves out (`--generation-config`).

Where they come from, as vLLM takes them (its `--generation-config` and
`--override-generation-config`), with one more source for files that carry none:

1. `--override-generation-config '{"temperature": 0.5}'`: fields that win over every other source;
2. `--generation-config auto` (the default): the model's own recommendation, which is
   - a Hugging Face directory's `generation_config.json` (temperature, top_p, top_k, min_p,
     repetition_penalty; `max_new_tokens` becomes the default output cap), or
   - a GGUF's `general.sampling.*` keys (llama.cpp's: temp, top_p, top_k, min_p, penalty_repeat),
   and when the files recommend nothing, the settings the model's authors publish for a known
   model (`KNOWN_MODELS`: SmolLM2's model card samples at temperature 0.2, top_p 0.9);
   `--generation-config none`: none of these (the OpenAI API's defaults: temperature 1, top_p 1);
   `--generation-config PATH`: the `generation_config.json` at PATH (a file or a directory).
3. What a field has in none of them: the OpenAI API's default.

`do_sample` is not read (vLLM does not read it either): a greedy default is `temperature: 0`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

# Request fields that take a default from the model (the names of generation_config.json).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")

# What a sampling field is when neither the request nor the model sets it (the OpenAI API's;
# top_k None: every token).
API_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": None, "min_p": 0.0, "repetition_penalty": 1.0}

# llama.cpp's GGUF sampling keys -> the request field each one is.
GGUF_SAMPLING_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}

# Models whose files carry no sampling settings, with the ones their authors publish: a pattern
# matched against the model's names (a GGUF's general.basename and general.name, the file or
# directory name, the installed model's name) -> (defaults, where they come from).
KNOWN_MODELS = (
    (re.compile(r"smollm2", re.IGNORECASE), {"temperature": 0.2, "top_p": 0.9},
     "SmolLM2's model card (huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)"),
)


class GenerationConfigError(ValueError):
    """A --generation-config or --override-generation-config that cannot be used; says why."""


@dataclass(frozen=True)
class GenerationDefaults:
    """Defaults of the sampling fields, the default output cap the model recommends, and where
    they come from (for /v1/models and the startup log)."""

    sampling: dict = field(default_factory=dict)
    max_new_tokens: int | None = None
    source: str = "the OpenAI API's defaults"


def resolve_generation_defaults(model_path: Path, names: tuple[str, ...] = (), spec: str = "auto",
                                overrides: dict | None = None) -> GenerationDefaults:
    """The defaults for a model at `model_path` (a directory or a .gguf file), known also by
    `names`, under `--generation-config spec` and `--override-generation-config overrides`."""
    if spec == "none":
        found = GenerationDefaults()
    elif spec == "auto":
        found = _model_defaults(Path(model_path), names)
    else:
        path = Path(spec)
        path = path / "generation_config.json" if path.is_dir() else path
        if not path.is_file():
            raise GenerationConfigError(f"--generation-config {spec}: no such file (give a generation_config.json, "
                                        "a directory holding one, 'auto' or 'none')")
        found = _from_hf_config(path, f"{path}")
    if not overrides:
        return found
    sampling, max_new_tokens = _checked(overrides, "--override-generation-config")
    return GenerationDefaults({**found.sampling, **sampling},
                              max_new_tokens if max_new_tokens is not None else found.max_new_tokens,
                              f"--override-generation-config over {found.source}")


def parse_overrides(text: str) -> dict:
    """--override-generation-config's JSON object, its fields checked."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GenerationConfigError(f"--override-generation-config is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise GenerationConfigError("--override-generation-config must be a JSON object, like '{\"temperature\": 0.5}'")
    _checked(value, "--override-generation-config")
    return value


def _model_defaults(model_path: Path, names: tuple[str, ...]) -> GenerationDefaults:
    if model_path.is_dir() and (model_path / "generation_config.json").is_file():
        found = _from_hf_config(model_path / "generation_config.json", "the model's generation_config.json",
                                lenient=True)
    elif model_path.suffix.lower() == ".gguf":
        found = _from_gguf(model_path)
        names = (*names, *_gguf_names(model_path))
    else:
        found = GenerationDefaults()
    if found.sampling:
        return found
    names = (*names, model_path.stem if model_path.is_file() else model_path.name)
    for pattern, sampling, source in KNOWN_MODELS:
        if any(pattern.search(name) for name in names if name):
            return GenerationDefaults(dict(sampling), found.max_new_tokens, source)
    return found if found.max_new_tokens is not None else GenerationDefaults()


def _from_hf_config(path: Path, source: str, lenient: bool = False) -> GenerationDefaults:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GenerationConfigError(f"{path} cannot be read as JSON: {exc}") from None
    if not isinstance(config, dict):
        raise GenerationConfigError(f"{path} is not a JSON object")
    known = {key: config[key] for key in (*SAMPLING_FIELDS, "max_new_tokens") if config.get(key) is not None}
    sampling, max_new_tokens = _checked(known, str(path), lenient=lenient)
    return GenerationDefaults(sampling, max_new_tokens, source)


def _from_gguf(path: Path) -> GenerationDefaults:
    from model.checkpoints.gguf_checkpoint import open_gguf  # the loader's cached reader: a file is parsed once

    reader = open_gguf(path)
    sampling = {}
    for key, name in GGUF_SAMPLING_KEYS.items():
        entry = reader.fields.get(key)
        if entry is not None:
            value = entry.contents()  # float32 in the file: 0.6 reads 0.6000000238...
            sampling[name] = float(f"{value:.7g}") if isinstance(value, float) else value
    sampling, _ = _checked(sampling, f"{path} (general.sampling)", lenient=True)
    return GenerationDefaults(sampling, None, "the GGUF's general.sampling keys")


def _gguf_names(path: Path) -> tuple[str, ...]:
    from model.checkpoints.gguf_checkpoint import open_gguf

    reader = open_gguf(path)
    names = []
    for key in ("general.basename", "general.name"):
        entry = reader.fields.get(key)
        if entry is not None:
            names.append(str(entry.contents()))
    return tuple(names)


def _checked(values: dict, where: str, lenient: bool = False) -> tuple[dict, int | None]:
    """The sampling fields and max_new_tokens of `values`, each in the range a request may ask
    for; anything else is an error naming it (`lenient`, for the model's own files: a warning,
    and the field is left out)."""
    if lenient:
        sampling, max_new_tokens = {}, None
        for key, value in values.items():
            try:
                found, cap = _checked({key: value}, where)
            except GenerationConfigError as exc:
                logger.warning("%s; the OpenAI API's default is used instead", exc)
                continue
            sampling.update(found)
            max_new_tokens = cap if cap is not None else max_new_tokens
        return sampling, max_new_tokens
    sampling = {}
    max_new_tokens = None
    for key, value in values.items():
        if key == "max_new_tokens":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GenerationConfigError(f"{where}: max_new_tokens must be a positive integer, got {value!r}")
            max_new_tokens = value
            continue
        if key not in SAMPLING_FIELDS:
            raise GenerationConfigError(f"{where}: {key!r} is not a field sinkserve takes from a generation config "
                                        f"(it takes {', '.join((*SAMPLING_FIELDS, 'max_new_tokens'))})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise GenerationConfigError(f"{where}: {key} must be a finite number, got {value!r}")
        bad = {"temperature": not 0 <= value <= 2, "top_p": not 0 < value <= 1, "min_p": not 0 <= value <= 1,
               "top_k": not (value in (-1, 0) or value >= 1) or value != int(value),
               "repetition_penalty": not 0 < value <= 10}[key]
        if bad:
            raise GenerationConfigError(f"{where}: {key}={value} is outside the range a request may ask for")
        sampling[key] = int(value) if key == "top_k" else float(value)
    if sampling.get("top_k") in (-1, 0):
        del sampling["top_k"]  # -1 (a request's), 0 (transformers'): no top-k
    return sampling, max_new_tokens
