"""Quantized linear layers (model/quantization/): each weight format against a float64 reference
of its own math, a GGUF's own Q4_0/Q4_1/Q8_0 codes taken exactly, the dispatch by rows, and whole
models under each method against the float model.

Tolerances come from the formats: bfloat16 keeps 8 significant bits, so a value rounded to it is
within 2^-8 of itself (relative), and the kernels that take bfloat16 activations round x, the
scales and the output each once."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.checkpoints.loader import load_model
from model.quantization import linear as quant_linear
from model.quantization.config import QuantizationConfig
from model.quantization.formats import Dense, Int4Groups, Int8Channels, Int8Dynamic, dequantize
from model.quantization.linear import ROW_BUCKETS, QuantLinear
from model.quantization.weights import GroupCodes
from tests.conftest import PagedDriver, save_hf_checkpoint

gguf = pytest.importorskip("gguf")
BF16 = 2.0 ** -8  # relative rounding of a value to bfloat16


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).double()


def assert_close_to(actual: torch.Tensor, reference: torch.Tensor, terms: torch.Tensor, rounding: float) -> None:
    """|actual - reference| <= rounding * (|x| @ |w|.T) elementwise: the error bound of a dot
    product whose inputs and output were each rounded by at most `rounding` (relative); `terms`
    is that sum of magnitudes."""
    bound = rounding * terms + 1e-6
    excess = (actual.double() - reference).abs() - bound
    assert excess.max() <= 0, f"error exceeds the bound by {excess.max():.3g} (bound {bound.max():.3g})"


@pytest.mark.parametrize("rows", [1, 3, 64])
def test_int4_groups_compute_their_own_math(rows):
    torch.manual_seed(0)
    n, k, group = 48, 128, 32
    codes = torch.randint(0, 16, (n, k))
    scale, offset = torch.rand(n, k // group) * 0.1, torch.randn(n, k // group) * 0.1
    fmt = Int4Groups.from_codes(codes, scale, offset, group)
    x = torch.randn(rows, k)
    s, z = bf16(scale).repeat_interleave(group, 1), bf16(offset).repeat_interleave(group, 1)
    weight = (codes.double() - 8) * s + z  # [N, K], with the scales as stored
    reference = bf16(x) @ weight.T
    # x and the output are rounded to bfloat16 once each
    assert_close_to(fmt.matmul(x), reference, x.double().abs() @ weight.abs().T, 3 * BF16)


def test_int4_from_float_stays_within_half_a_step():
    torch.manual_seed(1)
    weight = torch.randn(32, 64)
    fmt = Int4Groups.from_float(weight, 32)
    identity = torch.eye(64)
    rebuilt = fmt.matmul(identity).double().T  # [N, K] through the kernel itself (output in bf16)
    groups = weight.double().reshape(32, 2, 32)
    step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(32, 1)  # [N, K]
    # half a quantization step, plus the bfloat16 rounding of the scale, offset and output
    assert ((rebuilt - weight.double()).abs() <= step / 2 + 4 * BF16 * weight.double().abs().amax()).all()


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_int8_channels_compute_their_own_math(rows):
    torch.manual_seed(2)
    weight, x = torch.randn(40, 96), torch.randn(rows, 96)
    fmt = Int8Channels.from_float(weight)
    step = weight.double().abs().amax(dim=1, keepdim=True) / 127
    assert ((fmt.codes.double() * fmt.scale.double()[:, None] - weight.double()).abs() <= step / 2 + 1e-7).all()
    dequantized = fmt.codes.double() * bf16(fmt.scale)[:, None]  # the kernel takes the scales in bfloat16
    reference = bf16(x) @ dequantized.T
    assert_close_to(fmt.matmul(x), reference, x.double().abs() @ dequantized.abs().T, 3 * BF16)


@pytest.mark.parametrize("smoothed", [False, True])
def test_int8_dynamic_is_exactly_w8a8_per_token(smoothed):
    torch.manual_seed(3)
    weight, x = torch.randn(24, 64), torch.randn(7, 64) * torch.linspace(0.1, 10, 64)  # outlier channels
    smooth = torch.rand(64) + 0.5 if smoothed else None
    fmt = Int8Dynamic.from_float(weight, smooth)
    xs = x.double() / smooth.double() if smoothed else x.double()
    row_scale = xs.abs().amax(dim=1, keepdim=True) / 127
    codes = torch.round(xs / row_scale).clamp(-127, 127)
    ws = weight.double() * smooth.double() if smoothed else weight.double()
    w_scale = ws.abs().amax(dim=1) / 127
    w_codes = torch.round(ws / w_scale[:, None]).clamp(-127, 127)
    reference = (codes @ w_codes.T) * row_scale * w_scale  # integer products are exact
    assert torch.allclose(fmt.matmul(x).double(), reference, rtol=1e-5, atol=1e-5)
    # and it approximates the float product within the two quantization steps
    error = (fmt.matmul(x).double() - x.double() @ weight.double().T).abs()
    bound = (row_scale / 2) @ ws.abs().sum(dim=1, keepdim=True).T + xs.abs() @ (w_scale[:, None] / 2).expand_as(ws).T
    assert (error <= bound + 1e-5).all()


def test_group_codes_of_gguf_blocks_are_exact(tmp_path):
    """Q4_0, Q4_1 and Q8_0 tensors read as codes dequantize to what gguf's own dequantizer gives."""
    from model.checkpoints.gguf_checkpoint import _GROUP_CODES, open_gguf, release_gguf

    Q = gguf.GGMLQuantizationType
    rng = np.random.default_rng(4)
    writer = gguf.GGUFWriter(tmp_path / "codes.gguf", "llama")
    for qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0):
        weight = rng.standard_normal((32, 64)).astype(np.float32)
        writer.add_tensor(f"w.{qtype.name}", gguf.quants.quantize(weight, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for tensor in open_gguf(tmp_path / "codes.gguf").tensors:
        codes = _GROUP_CODES[tensor.tensor_type](tensor)
        expected = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type)).reshape(32, 64)
        assert torch.equal(codes.dequantize(), expected), tensor.name
        if codes.bits == 4:  # the int4 kernel rebuilds the same weights (scales in bfloat16)
            fmt = Int4Groups.from_codes(*codes.to_int4(), 32)
            q, s, z = codes.to_int4()
            rebuilt = (q.double() - 8) * bf16(s).repeat_interleave(32, 1) + bf16(z).repeat_interleave(32, 1)
            assert (rebuilt - expected.double()).abs().max() <= 2 * BF16 * expected.abs().max()
            x = torch.randn(3, 64)
            assert_close_to(fmt.matmul(x), bf16(x) @ rebuilt.T, x.double().abs() @ rebuilt.abs().T, 3 * BF16)
    release_gguf()


def test_stacked_parts_keep_codes_only_when_alike():
    config = QuantizationConfig("int4-weight")
    layer = QuantLinear(64, 48, False, config, parts=(16, 32))
    codes = [GroupCodes(torch.randint(0, 16, (rows, 64)), torch.rand(rows, 2), torch.zeros(rows, 2), 4, 32)
             for rows in (16, 32)]
    for index, part in enumerate(codes):
        layer.load_part(index, part)
    assert isinstance(layer._joined(), GroupCodes)
    layer.load_part(1, codes[1].dequantize())  # a float part: everything is dequantized
    assert isinstance(layer._joined(), torch.Tensor)
    with pytest.raises(ValueError, match="expected"):
        layer.load_part(0, torch.zeros(17, 64))


def test_the_dispatch_takes_the_fastest_format_per_row_count(monkeypatch):
    monkeypatch.setattr(quant_linear, "_dispatch_cache", {})
    layer = QuantLinear(64, 64, False, QuantizationConfig("int8-weight", batch_dense=True))
    layer.load_part(0, torch.randn(64, 64))
    measured = {}

    def fake_measure(formats, in_features):
        measured["formats"] = [f.name for f in formats]
        return tuple(0 if rows < 16 else 1 for rows in ROW_BUCKETS)

    monkeypatch.setattr(quant_linear, "_measure", fake_measure)
    layer.finish()
    assert measured["formats"] == ["int8", "dense"]
    assert layer.format_for(1).name == "int8" and layer.format_for(8).name == "int8"
    assert layer.format_for(9).name == "dense" and layer.format_for(1000).name == "dense"
    # a copy that never measures faster is not kept
    monkeypatch.setattr(quant_linear, "_dispatch_cache", {})
    monkeypatch.setattr(quant_linear, "_measure", lambda formats, k: tuple(0 for _ in ROW_BUCKETS))
    other = QuantLinear(64, 64, False, QuantizationConfig("int8-weight", batch_dense=True))
    other.load_part(0, torch.randn(64, 64))
    other.finish()
    assert [f.name for f in other.formats] == ["int8"]


TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2, vocab_size=512)


def _logits(model, prompts):
    driver = PagedDriver(model, num_blocks=64, block_size=4, seed=3)
    return driver.step(dict(enumerate(prompts)))


def _effective_weight(layer: QuantLinear) -> torch.Tensor:
    """The float weight a quantized layer's compact format stands for."""
    fmt = layer.formats[0]
    if isinstance(fmt, Int4Groups):  # read back through the kernel (the output rounds to bfloat16)
        return fmt.matmul(torch.eye(layer.in_features)).T.contiguous()
    return dequantize(fmt)


def _float_twin(quantized, path):
    """A bfloat16 float model of the same checkpoint whose linear layers hold the quantized
    model's effective weights, and whose W8A8 layers quantize their inputs per token as the
    quantized ones do: the quantized model's own math, in plain PyTorch."""
    twin = load_model(path, torch.bfloat16)
    layers = dict(quantized.named_modules())
    for name, module in twin.named_modules():
        if not isinstance(module, torch.nn.Linear) or name not in layers:
            continue
        source = layers[name]
        module.weight.data = _effective_weight(source).to(torch.bfloat16)
        fmt = source.formats[0]
        if isinstance(fmt, Int8Dynamic):
            def per_token(_, args, smooth=fmt.smooth):
                x = args[0].float() / (smooth if smooth is not None else 1)
                scale = x.abs().amax(dim=1, keepdim=True) / 127
                x = torch.round(x / scale).clamp(-127, 127) * scale
                return ((x * smooth if smooth is not None else x).to(args[0].dtype),)
            module.register_forward_pre_hook(per_token)
    return twin


@pytest.mark.parametrize("method", ["int4-weight", "int8-weight", "int8"])
def test_quantized_models_compute_their_own_weights(tmp_path, method):
    """A whole (random, tiny) model under each method against a bfloat16 float model holding the
    same effective weights (and, for int8, the same per-token input quantization): both compute
    the same math in bfloat16 and differ only by where they round, a few bfloat16 steps of the
    logits' spread. (What the quantization itself costs is measured on real models:
    benchmarks/quantization_quality.py.)"""
    save_hf_checkpoint(tmp_path / "hf", seed=5, **TINY)
    quantized = load_model(tmp_path / "hf", torch.bfloat16, quantization=QuantizationConfig(method))
    twin = _float_twin(quantized, tmp_path / "hf")
    prompts = [[5, 9, 200, 17, 3, 44, 12], [300, 2, 8]]
    expected, actual = _logits(twin, prompts), _logits(quantized, prompts)
    # int8 quantizes activations: a value the two round differently enough to land on the other
    # side of a rounding boundary moves by one activation step, 1/127 of its row's largest; a
    # few such steps per layer are allowed on top.
    allowed = 16 * BF16 + (8 / 127 if method == "int8" else 0)
    for seq in expected:
        error = (actual[seq].float() - expected[seq].float()).abs().max() / expected[seq].float().std()
        assert error <= allowed, f"{method}: error {error:.4f} of the logits' spread, allowed {allowed:.4f}"


def test_a_gguf_q4_1_file_is_served_from_its_own_codes(tmp_path):
    """auto on a Q4_1 file: every projection an int4 layer built from the file's codes, whose
    logits match the dequantized float model's within bfloat16 rounding."""
    from model.quantization.auto import resolve_quantization
    from model.checkpoints.loader import model_config
    from tests.test_gguf_model import write_gguf

    hf = save_hf_checkpoint(tmp_path / "hf", seed=6, **TINY)
    path = write_gguf(tmp_path / "tiny.gguf", hf, gguf.GGMLQuantizationType.Q4_1)
    config, dtype = resolve_quantization("auto", path, model_config(path), torch.device("cpu"), None, 32, 0.5)
    assert config.method == "int4-weight" and config.batch_dense and dtype == torch.bfloat16
    quantized = load_model(path, dtype, quantization=config)
    layers = [layer for layer in quantized.quant_layers() if not layer.lm_head]
    assert layers and all(layer.formats[0].name == "int4" for layer in layers)
    floats = load_model(path, torch.bfloat16)  # the same weights, dequantized, in bfloat16
    prompts = [[5, 9, 200, 17, 3, 44, 12]]
    expected, actual = _logits(floats, prompts)[0].float(), _logits(quantized, prompts)[0].float()
    # both are bfloat16 models of the same weights; they differ by rounding in different places
    assert (actual - expected).abs().max() / expected.std() <= 16 * BF16
    assert math.isclose(float(torch.softmax(actual[-1], -1).max()), float(torch.softmax(expected[-1], -1).max()),
                        rel_tol=0.05)


def test_dense_weights_keep_their_dtype():
    fmt = Dense(torch.randn(8, 16).to(torch.bfloat16))
    assert fmt.matmul(torch.randn(2, 16)).dtype == torch.float32


@pytest.mark.parametrize("method", ["int4-weight", "int8-weight", "int8"])
def test_shapes_a_kernel_cannot_take_step_down_and_run(method):
    """stories260K's MLP has 172 features, which neither packed kernel takes (PyTorch's int8 one
    crashes the process on it): those layers step down (int4 -> int8 -> bfloat16), and a long
    prompt (many rows through every kernel) and a decode run."""
    from model.sampling_params import SamplingParams
    from scheduler.engine import Engine

    engine = Engine(device="cpu", quantization=method, num_kv_blocks=64)
    kinds = {name: layer.formats[0].name for name, layer in engine.model.named_modules()
             if isinstance(layer, QuantLinear)}
    assert kinds["model.layers.0.mlp.down_proj"] == ("w8a8" if method == "int8" else "dense")  # K = 172
    assert kinds["model.layers.0.mlp.gate_up_proj"] == {"int4-weight": "int8", "int8-weight": "int8",
                                                         "int8": "w8a8"}[method]  # N = 344, K = 64
    assert kinds["model.layers.0.self_attn.qkv_proj"] == {"int4-weight": "int4", "int8-weight": "int8",
                                                           "int8": "w8a8"}[method]
    prompt = [(i * 7) % 500 + 3 for i in range(500)]
    [result] = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
    assert len(result.token_ids) == 8


def test_methods_a_gpu_serves_and_refuses(tmp_path):
    """On a GPU, int8 and int8-weight run on Triton kernels (tests/test_int8_matmul.py), the int4
    pack kernel is the CPU's: a one-line error, never a silent float model; auto serves bfloat16."""
    pytest.importorskip("triton")
    from model.checkpoints.loader import model_config
    from model.quantization.auto import resolve_quantization

    path = tmp_path / "hf"
    save_hf_checkpoint(path, seed=6, **TINY)
    cuda = torch.device("cuda")
    for method in ("int8", "int8-weight"):
        config, dtype = resolve_quantization(method, path, model_config(path), cuda, None, 32, 0.5)
        assert config.method == method and dtype == torch.bfloat16
    with pytest.raises(ValueError, match="int4-weight runs on a CPU"):
        resolve_quantization("int4-weight", path, model_config(path), cuda, None, 32, 0.5)
    config, dtype = resolve_quantization("auto", path, model_config(path), cuda, None, 32, 0.5)
    assert config.method == "none" and dtype == torch.bfloat16


def test_formats_move_with_their_tensors():
    weight = torch.randn(32, 64)
    fmt = Int8Dynamic.from_float(weight, torch.rand(64) + 0.5).to(torch.device("meta"))
    assert fmt.weights.codes.is_meta and fmt.weights.scale.is_meta and fmt.smooth.is_meta
    assert Int8Channels.from_float(weight).to(torch.device("meta")).codes.is_meta


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["int8-weight", "int8"])
def test_a_gpu_model_computes_what_the_cpu_model_does(tmp_path, method):
    """The same quantized checkpoint on the GPU (Triton int8 kernels) and on the CPU (PyTorch's):
    the same weights and codes, rounded in different places."""
    save_hf_checkpoint(tmp_path / "hf", seed=5, **TINY)
    prompts = [[5, 9, 200, 17, 3, 44, 12], [300, 2, 8]]
    logits = {}
    for device in ("cpu", "cuda"):
        model = load_model(tmp_path / "hf", torch.bfloat16, device, quantization=QuantizationConfig(method))
        driver = PagedDriver(model, num_blocks=64, block_size=4, seed=3)
        logits[device] = {seq: out.float().cpu() for seq, out in driver.step(dict(enumerate(prompts))).items()}
    allowed = 16 * BF16 + (8 / 127 if method == "int8" else 0)
    for seq, expected in logits["cpu"].items():
        assert (logits["cuda"][seq] - expected).abs().max() / expected.std() <= allowed




def _unfinished_int8_model(path, monkeypatch):
    """An int8 model as the loader leaves it before calibration: float weights staged."""
    import model.checkpoints.loader as loader

    monkeypatch.setattr(loader, "_quantize", lambda model, path: None)
    model = load_model(path, torch.float32, quantization=QuantizationConfig("int8"))
    layers = [layer for layer in model.quant_layers() if not layer.lm_head]
    assert layers and not any(layer.formats for layer in layers)
    return model, layers


def _calibrate_seeing_inputs(model, layers, tokens, alpha):
    """calibrate(), and the input each layer was given in its forward."""
    from model.quantization.smoothquant import calibrate

    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(mod, args[0].float()))
             for layer in layers]
    try:
        return calibrate(model, tokens, alpha), inputs
    finally:
        for hook in hooks:
            hook.remove()


CALIBRATION = [1] + [(7 * i) % 500 + 3 for i in range(40)]


def test_smoothquant_calibrates_layer_by_layer(tmp_path, monkeypatch):
    """In the calibration forward every layer outputs its W8A8 result (with the factors it just
    got), so a layer calibrates on the inputs the quantized model will give it."""
    from model.quantization.smoothquant import smoothing_factors

    save_hf_checkpoint(tmp_path / "hf", seed=7, **TINY)
    model, layers = _unfinished_int8_model(tmp_path / "hf", monkeypatch)
    factors, seen = _calibrate_seeing_inputs(model, layers, CALIBRATION, 0.5)
    float_inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda mod, args: float_inputs.__setitem__(mod, args[0].float()))
             for layer in layers]
    _logits(model, [CALIBRATION])  # the float model (staged weights), for comparison
    for hook in hooks:
        hook.remove()
    def moved(layer):  # how far the calibration input is from the float model's, relative
        return float((seen[layer] - float_inputs[layer]).abs().max() / float_inputs[layer].abs().max())

    assert moved(layers[0]) == 0  # the first projection sees the embeddings either way
    # the last sees the quantized model's activations: int8 steps (1/127 of a row's largest
    # value, a few of them), not the float noise of two prefills (about 1e-6)
    assert moved(layers[-1]) > 1e-3
    for layer in layers:
        assert torch.equal(factors[layer], smoothing_factors(layer, seen[layer].abs().amax(dim=0), 0.5))


def test_smoothquant_auto_takes_each_layers_best_alpha(tmp_path, monkeypatch):
    """alpha auto gives every layer the grid's factors whose W8A8 output on its calibration
    inputs is closest to the float output."""
    from model.quantization.smoothquant import ALPHA_GRID, smoothing_factors

    save_hf_checkpoint(tmp_path / "hf", seed=7, **TINY)
    model, layers = _unfinished_int8_model(tmp_path / "hf", monkeypatch)
    auto, seen = _calibrate_seeing_inputs(model, layers, CALIBRATION, "auto")

    def error(layer, factors):
        x, weight = seen[layer], layer.staged_weight()
        fmt = Int8Dynamic.from_float(weight, factors)
        return float((fmt.matmul(x) - x @ weight.T).pow(2).sum())

    picked = set()
    for layer in layers:
        input_max = seen[layer].abs().amax(dim=0)
        candidates = {alpha: smoothing_factors(layer, input_max, alpha) for alpha in ALPHA_GRID}
        alpha = next(a for a, f in candidates.items() if torch.equal(f, auto[layer]))
        picked.add(alpha)
        assert error(layer, auto[layer]) <= min(error(layer, f) for f in candidates.values()) * (1 + 1e-5)
    assert len(picked) > 1  # the layers differ: a search, not one alpha
