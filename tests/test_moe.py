"""kernels.moe.moe_token (one token, experts in this process: decode at batch 1) against kernels.moe.moe,
bit for bit, on the fast expert paths it runs over: fp32 with w1|w3 packed, bf16, int8 and int4 experts on
torch's CPU kernels."""

import pytest
import torch

from kernels.args import MoeArgs
from kernels.model import Experts, FeedForward, MoeLayer, pack_
from kernels.moe import moe, moe_token
from kernels.quant import quantize_experts

D, F, E = 64, 128, 8


def layer(k: int, dtype: torch.dtype, quant: int | None) -> MoeLayer:
    torch.manual_seed(k)
    m = MoeLayer(Experts(FeedForward(D, F) for _ in range(E)), torch.nn.Linear(D, E, bias=False), MoeArgs(E, k))
    m = m.to(dtype)
    if quant:
        quantize_experts(m, quant, group_size=64)
    return pack_(m)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("dtype,quant", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, 8),
                                         (torch.bfloat16, 4)])
def test_one_token_equals_moe(k, dtype, quant):
    m = layer(k, dtype, quant)
    xs = torch.randn(32, D, generator=torch.Generator().manual_seed(0)).to(dtype)
    seen = set()
    with torch.inference_mode():
        for x in xs.split(1):  # [1, D] each: 32 tokens, many different choices of experts
            ref = moe(x, m.gate.weight, k, m.experts)
            assert torch.equal(moe_token(x, m.gate.weight, k, m.experts), ref)
            if m.native is None:
                assert torch.equal(m(x), ref)  # the layer takes this path for one token
            else:  # fp32 on CPU: the C MoE kernel (tests/test_native.py), within rounding
                torch.testing.assert_close(m(x), ref, atol=1e-6, rtol=1e-6)
            seen.add(tuple(sorted(torch.topk(x.float() @ m.gate.weight.float().T, k).indices[0].tolist())))
    assert len(seen) > 4  # the tokens did choose different experts
