"""GGUF checkpoints (llama.cpp's one-file format) read through llama.cpp's own `gguf` package.

A GGUF file holds the hyperparameters as metadata fields, the tokenizer, and the tensors under
llama.cpp's names, often quantized. `gguf_model_config` turns the metadata into a ModelConfig
without reading any tensor data, so that a file sinkserve cannot serve is refused at once;
`gguf_tensors` yields the tensors in float32 under Hugging Face's names, shapes and layouts.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch

from model.checkpoints.config import ModelConfig, RopeConfig
from model.quantization.weights import GroupCodes
from model.layers.rotary import rope_inv_freq

SUPPORTED_GGUF_ARCHITECTURES = ("llama",)
# Llama 3.1-style divisors of the RoPE frequencies [head_dim // 2]. They are not a parameter:
# gguf_tensors yields the inverse frequencies they give, under the rotary buffer's name.
ROPE_FREQS = "rope_freqs.weight"
INV_FREQ = "model.layers.rotary.inv_freq"

# llama.cpp's tensor names, without `.weight` / `.bias`, to Hugging Face's.
_MODEL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)")


class GGUFError(ValueError):
    """A GGUF file sinkserve cannot serve; the message names the field, tensor or type."""


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """The reader of the GGUF file at `path`: metadata parsed, tensors memory-mapped, none read.

    Parsing takes seconds (a vocabulary is ~100k strings), so the last file's reader is kept
    for the model loader and the tokenizer to share, until `release_gguf()`; a file rewritten
    in place is parsed again.
    """
    path = Path(path).resolve()
    return _open_gguf(path, path.stat().st_mtime_ns)


def release_gguf() -> None:
    """Forget the cached reader, unmapping its file (once the tokenizer and weights are read)."""
    _open_gguf.cache_clear()


@functools.lru_cache(maxsize=1)
def _open_gguf(path: Path, mtime_ns: int) -> gguf.GGUFReader:
    try:
        # Copy-on-write: the tensors are writable views that torch wraps without a copy or a
        # read-only warning; nothing is ever written back to the file.
        reader = _PlainArrayReader(path, mode="c")
    except (ValueError, KeyError, IndexError) as exc:  # bad magic or version, a duplicate key, truncated
        raise GGUFError(f"{path.name} is not a GGUF file sinkserve can read: {exc}") from exc
    if reader.byte_order != "I":
        raise GGUFError(f"{path.name} is in the opposite byte order of this machine, which is not supported")
    return reader


class _PlainArrayReader(gguf.GGUFReader):
    """gguf's reader, parsing the file through a plain ndarray view of its np.memmap.

    The reader slices its file array a few times per metadata string; slicing an np.memmap
    runs Python code each time, which made parsing SmolLM2's file about 3x slower
    (benchmarks/load_time.py measures both).
    """

    @property
    def data(self) -> np.ndarray:
        return self._file_array

    @data.setter
    def data(self, mapped: np.memmap) -> None:
        self._file_array = np.asarray(mapped)  # a view: the map stays open through its base


def gguf_model_config(reader: gguf.GGUFReader) -> ModelConfig:
    """The model's config, from the file's metadata and tensor names alone."""
    arch = _required(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise GGUFError(f"general.architecture={arch!r} is not supported "
                        f"(supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})")
    experts = _value(reader, "llama.expert_count")
    if experts:
        raise GGUFError(f"llama.expert_count={experts} (a mixture of experts) is not supported")
    hidden = int(_required(reader, "llama.embedding_length"))
    num_heads = int(_required(reader, "llama.attention.head_count"))
    head_dim = int(_value(reader, "llama.attention.key_length") or hidden // num_heads)
    value_dim = _value(reader, "llama.attention.value_length")
    if value_dim is not None and value_dim != head_dim:
        raise GGUFError(f"llama.attention.value_length={value_dim} differs from the key length "
                        f"{head_dim}, which is not supported")
    rope_dims = _value(reader, "llama.rope.dimension_count")
    if rope_dims is not None and rope_dims != head_dim:
        raise GGUFError(f"llama.rope.dimension_count={rope_dims} is not head_dim={head_dim}: "
                        "partial rotary embeddings are not supported")
    tensor_names = {tensor.name for tensor in reader.tensors}
    return ModelConfig(
        vocab_size=_vocab_size(reader),
        hidden_size=hidden,
        intermediate_size=int(_required(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_required(reader, "llama.block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(_value(reader, "llama.attention.head_count_kv") or num_heads),
        head_dim=head_dim,
        max_position_embeddings=int(_required(reader, "llama.context_length")),
        rms_norm_eps=float(_required(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope=_rope(reader),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        mlp_bias="blk.0.ffn_gate.bias" in tensor_names,
        bos_token_id=_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=_stop_ids(reader),
        architecture="LlamaForCausalLM",
    )


def gguf_tensors(reader: gguf.GGUFReader, config: ModelConfig, keep_codes: bool = False
                 ) -> Iterator[tuple[str, torch.Tensor | GroupCodes]]:
    """Every tensor of the file as (Hugging Face name, float32 tensor in HF's shape and layout).

    All names are checked before any tensor data is read. `rope_freqs.weight` comes out as
    the inverse frequencies it gives, named `model.layers.rotary.inv_freq`. With `keep_codes`, the
    projection weights stored as Q4_0, Q4_1 or Q8_0 come as their own codes (`GroupCodes`),
    for layers that keep them (model/quantization/).
    """
    hf_names = [_hf_name(tensor.name) for tensor in reader.tensors]
    for tensor, name in zip(reader.tensors, hf_names):
        if keep_codes and tensor.tensor_type in _GROUP_CODES and name.endswith("_proj.weight"):
            codes = _GROUP_CODES[tensor.tensor_type](tensor)
            if name.endswith(".q_proj.weight"):
                codes = codes.rows(_rope_row_order(codes.shape[0], config.num_attention_heads, config.head_dim,
                                                   tensor.name))
            elif name.endswith(".k_proj.weight"):
                codes = codes.rows(_rope_row_order(codes.shape[0], config.num_key_value_heads, config.head_dim,
                                                   tensor.name))
            yield name, codes
            continue
        weight = _dequantize(tensor)
        if tensor.name == ROPE_FREQS:
            if tuple(weight.shape) != (config.head_dim // 2,):
                raise GGUFError(f"tensor {ROPE_FREQS!r} has shape {tuple(weight.shape)}, "
                                f"expected ({config.head_dim // 2},)")
            yield name, rope_inv_freq(config.rope, config.head_dim) / weight
        elif name.endswith((".q_proj.weight", ".q_proj.bias")):
            yield name, _unpermute_rope_rows(weight, config.num_attention_heads, config.head_dim, tensor.name)
        elif name.endswith((".k_proj.weight", ".k_proj.bias")):
            yield name, _unpermute_rope_rows(weight, config.num_key_value_heads, config.head_dim, tensor.name)
        else:
            yield name, weight


def _value(reader: gguf.GGUFReader, key: str) -> int | float | str | bool | None:
    """Metadata field `key`, None when the file does not have it."""
    field = reader.get_field(key)
    if field is None:
        return None
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        raise GGUFError(f"{key} is an array (one value per layer), which is not supported")
    return field.contents()


def _required(reader: gguf.GGUFReader, key: str) -> int | float | str | bool:
    value = _value(reader, key)
    if value is None:
        raise GGUFError(f"the GGUF metadata has no {key!r}")
    return value


def _vocab_size(reader: gguf.GGUFReader) -> int:
    vocab_size = _value(reader, "llama.vocab_size")
    if vocab_size is not None:
        return int(vocab_size)
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFError("the GGUF metadata has neither 'llama.vocab_size' nor 'tokenizer.ggml.tokens'")
    return len(tokens.data)


def _stop_ids(reader: gguf.GGUFReader) -> tuple[int, ...]:
    stop_ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        token_id = _value(reader, key)
        if token_id is not None and token_id not in stop_ids:
            stop_ids.append(int(token_id))
    return tuple(stop_ids)


def _rope(reader: gguf.GGUFReader) -> RopeConfig:
    # llama.cpp's reading: no scaling type means linear, a factor of 0 or 1 (or an absent one,
    # also under the older key `rope.scale_linear`) means none, and type "none" ignores it.
    theta = float(_value(reader, "llama.rope.freq_base") or 10000.0)
    scaling = _value(reader, "llama.rope.scaling.type")
    if scaling not in (None, "none", "linear"):
        raise GGUFError(f"llama.rope.scaling.type={scaling!r} is not supported (supported: none, linear)")
    factor = float(_value(reader, "llama.rope.scaling.factor") or _value(reader, "llama.rope.scale_linear") or 1.0)
    if scaling == "none" or factor == 1.0:
        return RopeConfig(theta=theta)
    return RopeConfig(theta=theta, rope_type="linear", factor=factor)


def _hf_name(gguf_name: str) -> str:
    if gguf_name == ROPE_FREQS:
        return INV_FREQ
    base, _, kind = gguf_name.rpartition(".")
    if kind in ("weight", "bias"):
        if base in _MODEL_TENSORS:
            return f"{_MODEL_TENSORS[base]}.{kind}"
        layer = _LAYER_TENSOR.fullmatch(base)
        if layer and layer[2] in _LAYER_TENSORS:
            return f"model.layers.{layer[1]}.{_LAYER_TENSORS[layer[2]]}.{kind}"
    raise GGUFError(f"unexpected tensor {gguf_name!r} for a llama model")


def _dequantize(tensor: gguf.gguf_reader.ReaderTensor) -> torch.Tensor:
    """The tensor in float32 (its own memory), in Hugging Face's shape: GGUF lists dims fastest first."""
    shape = tuple(reversed(tensor.shape.tolist()))
    if tensor.tensor_type in _TORCH_DEQUANTIZE:
        raw = torch.from_numpy(tensor.data.reshape(-1).view(np.uint8))  # [bytes]
        return _TORCH_DEQUANTIZE[tensor.tensor_type](raw).reshape(shape)
    try:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise GGUFError(f"tensor {tensor.name!r} has type {tensor.tensor_type.name}, "
                        "which the gguf package cannot dequantize") from exc
    return torch.from_numpy(array).reshape(shape)


# gguf.quants.dequantize works on 16 rows at a time in numpy; these whole-tensor versions of
# the common types are faster (benchmarks/load_time.py measures both on a file), and tests check
# them equal to gguf's, bit for bit. Each takes the tensor's bytes [n_bytes]
# and gives a new float32 tensor of its elements, flat or by block.
def _dequantize_q8_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 34)  # [N, 2 + 32]: fp16 scale d, 32 int8 quants q; x = q * d
    scale = blocks[:, :2].view(torch.float16).float()  # [N, 1]
    return blocks[:, 2:].view(torch.int8) * scale  # [N, 32]


def _dequantize_q4_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 18)  # [N, 2 + 16]: fp16 scale d, 32 4-bit quants q; x = (q - 8) * d
    scale = blocks[:, :2].view(torch.float16).float()  # [N, 1]
    return (_nibbles(blocks[:, 2:]).view(torch.int8) - 8) * scale  # [N, 32]


def _dequantize_q4_1(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 20)  # [N, 2 + 2 + 16]: fp16 scale d and min m, 32 4-bit quants q; x = q * d + m
    scale = blocks[:, :2].view(torch.float16).float()  # [N, 1]
    minimum = blocks[:, 2:4].view(torch.float16).float()  # [N, 1]
    return (_nibbles(blocks[:, 4:]) * scale).add_(minimum)  # [N, 32]


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[N, 16] bytes -> [N, 32] 4-bit values: a block's first 16 in the low nibbles, the rest high."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=1)


_TORCH_DEQUANTIZE = {
    gguf.GGMLQuantizationType.F32: lambda raw: raw.view(torch.float32).clone(),  # not a view of the file
    gguf.GGMLQuantizationType.F16: lambda raw: raw.view(torch.float16).float(),
    gguf.GGMLQuantizationType.BF16: lambda raw: raw.view(torch.bfloat16).float(),
    gguf.GGMLQuantizationType.Q8_0: _dequantize_q8_0,
    gguf.GGMLQuantizationType.Q4_0: _dequantize_q4_0,
    gguf.GGMLQuantizationType.Q4_1: _dequantize_q4_1,
}


def _raw_blocks(tensor: gguf.gguf_reader.ReaderTensor, block_bytes: int) -> tuple[torch.Tensor, int, int]:
    """The tensor's blocks [N * K / 32, block_bytes] (uint8, a view of the file) and (N, K)."""
    n, k = (int(d) for d in reversed(tensor.shape.tolist()))
    raw = torch.from_numpy(tensor.data.reshape(-1).view(np.uint8))
    return raw.view(-1, block_bytes), n, k


def _codes_q8_0(tensor) -> GroupCodes:
    blocks, n, k = _raw_blocks(tensor, 34)  # fp16 d, 32 int8 q: x = q * d
    scale = blocks[:, :2].view(torch.float16).float().reshape(n, k // 32)
    return GroupCodes(blocks[:, 2:].view(torch.int8).reshape(n, k).clone(), scale, torch.zeros_like(scale), 8, 32)


def _codes_q4_0(tensor) -> GroupCodes:
    blocks, n, k = _raw_blocks(tensor, 18)  # fp16 d, 32 4-bit q: x = (q - 8) * d
    scale = blocks[:, :2].view(torch.float16).float().reshape(n, k // 32)
    return GroupCodes(_nibbles(blocks[:, 2:]).reshape(n, k), scale, -8 * scale, 4, 32)


def _codes_q4_1(tensor) -> GroupCodes:
    blocks, n, k = _raw_blocks(tensor, 20)  # fp16 d and m, 32 4-bit q: x = q * d + m
    scale = blocks[:, :2].view(torch.float16).float().reshape(n, k // 32)
    minimum = blocks[:, 2:4].view(torch.float16).float().reshape(n, k // 32)
    return GroupCodes(_nibbles(blocks[:, 4:]).reshape(n, k), scale, minimum, 4, 32)


_GROUP_CODES = {
    gguf.GGMLQuantizationType.Q8_0: _codes_q8_0,
    gguf.GGMLQuantizationType.Q4_0: _codes_q4_0,
    gguf.GGMLQuantizationType.Q4_1: _codes_q4_1,
}


def _rope_row_order(num_rows: int, num_heads: int, head_dim: int, gguf_name: str) -> torch.Tensor:
    """The row index that undoes llama.cpp's q/k permutation (as `_unpermute_rope_rows` does)."""
    return _unpermute_rope_rows(torch.arange(num_rows), num_heads, head_dim, gguf_name)


def _unpermute_rope_rows(weight: torch.Tensor, num_heads: int, head_dim: int, gguf_name: str) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's `permute` of q/k rows (weights [H * D, in] or biases [H * D]).

    llama.cpp rotates adjacent pairs, so the converter interleaved each head's two rotary
    halves (rows 0, D/2, 1, D/2 + 1, ...); Hugging Face's rotate-half keeps them apart.
    """
    if weight.shape[0] != num_heads * head_dim:
        raise GGUFError(f"tensor {gguf_name!r} has {weight.shape[0]} rows, expected "
                        f"{num_heads} heads x head_dim {head_dim} from the GGUF metadata")
    rest = weight.shape[1:]
    pairs = weight.reshape(num_heads, head_dim // 2, 2, *rest)  # [H, D/2, 2, *rest]: (pair, half)
    return pairs.transpose(1, 2).reshape(weight.shape)  # [H, 2, D/2, *rest] -> [H * D, *rest]
