"""A LLaMA decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) over a flat token batch.

One forward takes the new tokens of many sequences at once, prefill chunks and single decode
tokens mixed, `input_ids [T]`, with an `AttentionMetadata` that says where each token's K/V
goes in the paged pool and what each sequence attends to. Module and parameter names follow
Hugging Face's `LlamaForCausalLM`, so checkpoints load by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.layers.attention import AttentionMetadata, paged_attention, write_kv
from model.layers.attention_backend import attention_functions
from model.checkpoints.config import ModelConfig
from model.layers.kv_quant import packed_head_dim
from model.layers.linear import Linear
from model.quantization.config import QuantizationConfig
from model.quantization.linear import QuantLinear
from model.layers.rotary import RotaryEmbedding, apply_rotary

# One (k_cache, v_cache) pair per layer, each [num_blocks, block_size, num_kv_heads, head_dim].
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


def linear(in_features: int, out_features: int, bias: bool, quantization: QuantizationConfig | None,
           parts: tuple[int, ...] | None = None) -> nn.Module:
    """A float `Linear`, or a `QuantLinear` under a quantized method (`parts`: the rows of the
    checkpoint tensors stacked into it)."""
    if quantization is None or not quantization.quantized:
        return Linear(in_features, out_features, bias=bias)
    return QuantLinear(in_features, out_features, bias, quantization, parts)


@dataclass
class PartTarget:
    """Where a checkpoint tensor goes in a QuantLinear: its part `index` (q, k or v; gate or up)."""

    layer: QuantLinear
    index: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.layer.parts[self.index], self.layer.in_features


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # As transformers does: normalised in float32, rounded, then scaled.
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


@dataclass
class RopeAngles:
    """cos and sin [T, head_dim // 2] of one forward's new tokens, computed once for every layer:
    at their absolute positions (q and k), and at their cache positions (the sink query; None
    when the batch has no evictions, where the two agree). See model/layers/attention.py."""

    cos: torch.Tensor
    sin: torch.Tensor
    sink_cos: torch.Tensor | None = None
    sink_sin: torch.Tensor | None = None

    @classmethod
    def of(cls, rotary: RotaryEmbedding, meta: AttentionMetadata, dtype: torch.dtype) -> "RopeAngles":
        if meta.rope_positions is None:
            return cls(*rotary.cos_sin(meta.positions, dtype))
        return cls(*rotary.cos_sin(meta.rope_positions, dtype), *rotary.cos_sin(meta.positions, dtype))


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, quantization: QuantizationConfig | None = None):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        bias = config.attention_bias
        hidden = config.hidden_size
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # q_proj, k_proj and v_proj of the checkpoint, stacked: one matmul (checkpoint_tensors).
        self.qkv_proj = linear(hidden, self.q_size + 2 * self.kv_size, bias, quantization,
                               (self.q_size, self.kv_size, self.kv_size))
        self.o_proj = linear(self.num_heads * self.head_dim, hidden, bias, quantization)
        # The PyTorch reference until LlamaForCausalLM.set_attention_backend picks another.
        self.write_kv, self.paged_attention = write_kv, paged_attention

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, kv_cache: tuple[torch.Tensor, torch.Tensor],
                rope: RopeAngles) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) * D]
        qk = qkv[:, :self.q_size + self.kv_size].view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size:].view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        # q and k rotated together at the tokens' absolute positions; keys are stored so and
        # never rotated again.
        q, k = apply_rotary(qk, rope.cos, rope.sin).split([self.num_heads, self.num_kv_heads], dim=1)
        k_cache, v_cache = kv_cache
        self.write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        q_sink = None
        if rope.sink_cos is not None:
            q_sink = apply_rotary(qk[:, :self.num_heads], rope.sink_cos, rope.sink_sin)  # [T, Hq, D]
        out = self.paged_attention(q, q_sink, k_cache, v_cache, meta, self.scale)  # [T, Hq, D]
        return self.o_proj(out.view(num_tokens, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, quantization: QuantizationConfig | None = None):
        super().__init__()
        hidden, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        # gate_proj and up_proj of the checkpoint, stacked: one matmul (checkpoint_tensors).
        self.gate_up_proj = linear(hidden, 2 * inter, bias, quantization, (inter, inter))
        self.down_proj = linear(inter, hidden, bias, quantization)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [T, inter] each
        return self.down_proj(F.silu(gate).mul_(up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, quantization: QuantizationConfig | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, quantization)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, quantization)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, kv_cache: tuple[torch.Tensor, torch.Tensor],
                rope: RopeAngles) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), meta, kv_cache, rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, quantization: QuantizationConfig | None = None):
        super().__init__()
        # Uninitialised (the loader fills it): a random init on the meta device would import
        # torch._dynamo, 2 s of every model load.
        self.embed_tokens = nn.Embedding.from_pretrained(torch.empty(config.vocab_size, config.hidden_size))
        # One rotary module for every layer (its angles are computed once per forward).
        self.rotary = RotaryEmbedding(config.rope, config.head_dim)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, quantization) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_caches: KVCache) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, hidden]
        rope = RopeAngles.of(self.rotary, meta, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, meta, kv_cache, rope)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """The decoder plus the LM head; `forward` gives hidden states, `compute_logits` logits."""

    def __init__(self, config: ModelConfig, quantization: QuantizationConfig | None = None):
        super().__init__()
        self.config = config
        self.quantization = quantization or QuantizationConfig()
        self.kv_cache_dtype: torch.dtype | None = None  # None: the model's dtype; torch.int8: kv_quant
        self.model = LlamaModel(config, self.quantization)
        if self.quantization.quantized:
            self.lm_head = QuantLinear(config.hidden_size, config.vocab_size, False, self.quantization, lm_head=True)
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if not self.config.tie_word_embeddings:
            return
        if isinstance(self.lm_head, QuantLinear):
            self.lm_head.tied_weight = self.model.embed_tokens.weight
        else:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_rope_frequencies(self, inv_freq: torch.Tensor) -> None:
        """Rotate queries and keys by these inverse frequencies [head_dim // 2] (rotary.py)."""
        self.model.rotary.set_inv_freq(inv_freq)

    def quant_layers(self) -> list[QuantLinear]:
        return [module for module in self.modules() if isinstance(module, QuantLinear)]

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_caches: KVCache) -> torch.Tensor:
        """Hidden states [T, hidden] of the new tokens; their K/V are written into kv_caches."""
        return self.model(input_ids, meta, kv_caches)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor | PartTarget]:
        """The model's tensors under their Hugging Face checkpoint names, the stacked projections
        as views of their parts (q_proj, k_proj, v_proj; gate_proj, up_proj): what a loader fills.
        A quantized layer's weights are `PartTarget`s (QuantLinear.load_part takes them). A tied
        lm_head appears once, as the embedding."""
        tensors: dict[str, torch.Tensor | PartTarget] = {}
        for prefix, layer in self.named_modules():
            if isinstance(layer, QuantLinear) and not (layer.lm_head and self.config.tie_word_embeddings):
                if prefix.endswith(".qkv_proj"):
                    attn = prefix.removesuffix(".qkv_proj")
                    names = [f"{attn}.{part}.weight" for part in ("q_proj", "k_proj", "v_proj")]
                elif prefix.endswith(".gate_up_proj"):
                    mlp = prefix.removesuffix(".gate_up_proj")
                    names = [f"{mlp}.{part}.weight" for part in ("gate_proj", "up_proj")]
                else:
                    names = [f"{prefix}.weight"]
                tensors.update({name: PartTarget(layer, index) for index, name in enumerate(names)})
        for name, param in self.named_parameters():
            prefix, _, kind = name.rpartition(".")  # kind: weight or bias
            if prefix.endswith(".qkv_proj"):
                attn = prefix.removesuffix(".qkv_proj")
                q, k, v = param.split([self.config.num_attention_heads * self.config.head_dim,
                                       self.config.num_key_value_heads * self.config.head_dim,
                                       self.config.num_key_value_heads * self.config.head_dim])
                tensors.update({f"{attn}.q_proj.{kind}": q, f"{attn}.k_proj.{kind}": k, f"{attn}.v_proj.{kind}": v})
            elif prefix.endswith(".gate_up_proj"):
                mlp = prefix.removesuffix(".gate_up_proj")
                gate, up = param.chunk(2)
                tensors.update({f"{mlp}.gate_proj.{kind}": gate, f"{mlp}.up_proj.{kind}": up})
            else:
                tensors[name] = param
        return tensors

    def set_attention_backend(self, backend: str) -> None:
        """Run attention with a resolved backend, `torch` or `triton` (model/layers/attention_backend.py)."""
        write, attend = attention_functions(backend)
        for layer in self.model.layers:
            layer.self_attn.write_kv, layer.self_attn.paged_attention = write, attend

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab] for hidden states [N, hidden] (only the rows that need them)."""
        return self.lm_head(hidden).float()

    def kv_cache_layout(self) -> tuple[torch.dtype, int]:
        """The KV pool's dtype and the length of a head's row: the model's dtype and head_dim, or
        for an int8 cache (`kv_cache_dtype`) int8 and head_dim plus its scale (model/layers/kv_quant.py)."""
        if self.kv_cache_dtype == torch.int8:
            return torch.int8, packed_head_dim(self.config.head_dim)
        return self.model.embed_tokens.weight.dtype, self.config.head_dim

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> KVCache:
        """Zeroed K and V pools for every layer (zeros keep masked-out padding finite)."""
        cfg = self.config
        dtype, row = self.kv_cache_layout()
        device = self.model.embed_tokens.weight.device
        shape = (num_blocks, block_size, cfg.num_key_value_heads, row)
        return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                for _ in range(cfg.num_hidden_layers)]
