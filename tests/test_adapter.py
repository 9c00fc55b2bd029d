import pytest
import torch

from rep_easyedit.core.adapter import GatedLowRankAdapter


def test_identity_at_start():
    torch.manual_seed(0)
    adapter = GatedLowRankAdapter(48, rank=4)
    keys = torch.randn(3, 7, 48)
    assert torch.equal(adapter(keys, hard=False), keys)
    assert torch.equal(adapter.eval()(keys), keys)


def test_hard_gate_leaves_other_tokens_bit_identical():
    torch.manual_seed(0)
    adapter = GatedLowRankAdapter(16, rank=4, tau=0.9).eval()
    with torch.no_grad():
        adapter.up.weight.normal_()
        # gate fires only where the first coordinate is large
        adapter.gate[0].weight.zero_(); adapter.gate[0].bias.zero_()
        adapter.gate[0].weight[0, 0] = 1.0
        adapter.gate[2].weight.fill_(10.0); adapter.gate[2].bias.fill_(-20.0)
    keys = torch.randn(10, 16)
    keys[:5, 0] = 10.0   # gate ≈ sigmoid(10*10-20) → fires
    keys[5:, 0] = -10.0  # gate ≈ sigmoid(-20) → stays shut
    out = adapter(keys)
    assert torch.equal(out[5:], keys[5:])
    assert not torch.allclose(out[:5], keys[:5])
    expected = keys[:5] + adapter.delta(keys[:5])
    assert torch.allclose(out[:5], expected)


def test_soft_gate_in_training_mode_scales_delta():
    torch.manual_seed(0)
    adapter = GatedLowRankAdapter(16, rank=4).train()
    with torch.no_grad():
        adapter.up.weight.normal_()
    keys = torch.randn(5, 16)
    g = adapter.gate_prob(keys)
    assert torch.allclose(adapter(keys), keys + g * adapter.delta(keys), atol=1e-6)


def test_active_switch_turns_adapter_off_exactly():
    adapter = GatedLowRankAdapter(16, rank=4, tau=0.01).eval()
    with torch.no_grad():
        adapter.up.weight.normal_()
        adapter.active.zero_()
    keys = torch.randn(4, 16)
    assert torch.equal(adapter(keys), keys)


def test_state_dict_round_trip():
    torch.manual_seed(1)
    a = GatedLowRankAdapter(32, rank=8)
    with torch.no_grad():
        a.up.weight.normal_()
    b = GatedLowRankAdapter(32, rank=8)
    b.load_state_dict(a.state_dict())
    keys = torch.randn(6, 32)
    assert torch.equal(a.eval()(keys), b.eval()(keys))
    assert set(a.state_dict()) >= {"down.weight", "up.weight", "active"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtype_follows_input_math_in_float32(dtype):
    torch.manual_seed(0)
    adapter = GatedLowRankAdapter(32, rank=4, tau=0.01).eval()
    with torch.no_grad():
        adapter.up.weight.normal_(std=0.1)
    keys = torch.randn(3, 32).to(dtype)
    out = adapter(keys)
    assert out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    ref = (keys.float() + adapter.delta(keys.float())).to(dtype)
    assert torch.equal(out, ref)


def test_bad_arguments():
    with pytest.raises(ValueError, match="tau"):
        GatedLowRankAdapter(8, tau=1.5)
    with pytest.raises(ValueError, match="rank"):
        GatedLowRankAdapter(8, rank=0)
