"""OneDnnLinear (prepacked oneDNN GEMM, GELU fused as a post-op) against torch's own Linear and GELU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.router.minilm import (
    LINEAR_NAMES,
    BertConfig,
    MiniLM,
    OneDnnLinear,
    onednn_available,
    prepack_for_onednn,
    script_for_inference,
)

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

TINY = BertConfig(
    vocab_size=50,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    max_positions=16,
    layer_norm_eps=1e-12,
)


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(48, 96).eval()


@pytest.mark.parametrize("rows", [1, 7, 300])
@torch.inference_mode()
def test_matches_nn_linear(linear: nn.Linear, rows: int) -> None:
    x = torch.randn(rows, 48)
    torch.testing.assert_close(OneDnnLinear(linear)(x), linear(x), rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_gelu_post_op_is_the_exact_erf_gelu(linear: nn.Linear) -> None:
    x = torch.randn(40, 48) * 3  # wide enough that tanh-approximated GELU would differ
    expected = F.gelu(linear(x))
    assert (F.gelu(linear(x), approximate="tanh") - expected).abs().max() > 1e-4
    torch.testing.assert_close(OneDnnLinear(linear, "gelu")(x), expected, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_batched_input_keeps_its_leading_dimensions(linear: nn.Linear) -> None:
    x = torch.randn(3, 5, 48)
    out = OneDnnLinear(linear)(x)
    assert out.shape == (3, 5, 96)
    torch.testing.assert_close(out, linear(x), rtol=1e-5, atol=1e-5)


def test_refuses_what_it_cannot_run(linear: nn.Linear) -> None:
    with pytest.raises(ValueError, match="activation"):
        OneDnnLinear(linear, "relu")
    with pytest.raises(ValueError, match="bias"):
        OneDnnLinear(nn.Linear(4, 4, bias=False))
    with pytest.raises(ValueError, match="fp32 or bf16"):  # it used to upcast, then fail at the first GEMM
        OneDnnLinear(linear.to(torch.float16))


needs_bf16 = pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN runs no bf16 GEMM on this CPU"
)


@needs_bf16
@pytest.mark.parametrize("activation", ["none", "gelu"])
@torch.inference_mode()
def test_bf16_matches_fp32_to_bf16_rounding(linear: nn.Linear, activation: str) -> None:
    x = torch.randn(33, 48)
    expected = linear(x) if activation == "none" else F.gelu(linear(x))
    out = OneDnnLinear(linear.to(torch.bfloat16), activation)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    # Inputs and weights rounded to 8 mantissa bits, fp32 accumulation: about 2^-8 of the output's scale.
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    assert not torch.equal(out.float(), expected)  # it really ran in bf16, not fp32 upcast and back


def twin_models(seed: int) -> tuple[MiniLM, MiniLM]:
    """Two tiny models with the same random weights: one to pack, one to compare with."""
    torch.manual_seed(seed)
    model = MiniLM(TINY).eval()
    reference = MiniLM(TINY).eval()
    reference.load_state_dict(model.state_dict())
    return model, reference


@needs_bf16
@torch.inference_mode()
def test_bf16_model_prepacks_and_stays_close_to_fp32() -> None:
    model, reference = twin_models(2)
    model = prepack_for_onednn(model.to(torch.bfloat16))
    assert all(isinstance(layer.qkv, OneDnnLinear) for layer in model.layers)
    ids = torch.randint(0, TINY.vocab_size, (4 * 7,))
    positions = torch.arange(7).repeat(4)
    out = script_for_inference(model)(ids, positions, [(7, 4)])
    cosine = F.cosine_similarity(out.float(), reference(ids, positions, [(7, 4)]), dim=-1)
    assert out.shape == (4, TINY.hidden_size) and cosine.min() > 0.999


def test_onednn_has_no_fp16_path() -> None:
    assert not onednn_available(torch.float16)


@torch.inference_mode()
def test_prepacked_model_matches_and_scripts() -> None:
    model, reference = twin_models(1)
    ids = torch.randint(0, TINY.vocab_size, (3 * 5 + 2 * 9,))
    positions = torch.cat([torch.arange(5).repeat(3), torch.arange(9).repeat(2)])
    groups = [(5, 3), (9, 2)]

    assert prepack_for_onednn(model) is model
    for layer in model.layers:
        assert all(isinstance(getattr(layer, name), OneDnnLinear) for name in LINEAR_NAMES)
        assert isinstance(layer.ffn_act, nn.Identity)  # GELU now runs inside ffn_in
        assert layer.ffn_in.activation == "gelu" and layer.qkv.activation == "none"
    expected = reference(ids, positions, groups)
    torch.testing.assert_close(model(ids, positions, groups), expected, rtol=1e-5, atol=1e-5)
    scripted = script_for_inference(model)
    assert isinstance(scripted, torch.jit.ScriptModule)
    torch.testing.assert_close(scripted(ids, positions, groups), expected, rtol=1e-5, atol=1e-5)


def test_prepacking_twice_changes_nothing() -> None:
    model = prepack_for_onednn(MiniLM(TINY).eval())
    before = [getattr(layer, name) for layer in model.layers for name in (*LINEAR_NAMES, "ffn_act")]
    prepack_for_onednn(model)
    assert [getattr(layer, name) for layer in model.layers for name in (*LINEAR_NAMES, "ffn_act")] == before


def test_a_failure_leaves_the_model_unpacked(monkeypatch: pytest.MonkeyPatch) -> None:
    model = MiniLM(TINY).eval()
    calls = 0
    real = torch.ops.mkldnn._reorder_linear_weight

    def fail_on_the_fifth(weight: torch.Tensor, rows: int) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 5:  # the second layer's first GEMM: the first layer is already packed by then
            raise RuntimeError("simulated oneDNN failure")
        return real(weight, rows)

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", fail_on_the_fifth)
    with pytest.raises(RuntimeError, match="simulated"):
        prepack_for_onednn(model)
    for layer in model.layers:
        assert all(type(getattr(layer, name)) is nn.Linear for name in LINEAR_NAMES)
        assert isinstance(layer.ffn_act, nn.GELU)


def test_onednn_is_unavailable_when_its_gemm_fails_though_packing_works(monkeypatch: pytest.MonkeyPatch) -> None:
    assert onednn_available()

    def fail(*args: object) -> torch.Tensor:
        raise RuntimeError("could not create a primitive descriptor")

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", fail)
    assert not onednn_available()
