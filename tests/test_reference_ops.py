"""The eager reference ops: float64 gradients by finite differences, and the saliency's
definition on a hand-checkable case. Whole-model parity with METHOD.md is in
test_spec_parity.py; every other backend's ops are tested against these."""
import pytest
import torch

from svpt import reference


def _rand(*shape, grad=True):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=grad)


@pytest.mark.parametrize("prompt_batch", [1, 2])
def test_da_mix_gradients(prompt_batch):
    tokens, prompts = _rand(2, 9, 6), _rand(prompt_batch, 3, 6)
    weight, bias = _rand(2, 6), _rand(())
    assert torch.autograd.gradcheck(lambda *a: reference.da_mix(*a, 2), (tokens, prompts, weight, bias))


@pytest.mark.parametrize("kv_batch, tq, tk, rows", [(2, 7, 7, (0, 1)), (2, 7, 7, (1, 3)), (1, 5, 3, None)])
def test_prompt_attention_gradients(kv_batch, tq, tk, rows):
    q, k, v = _rand(2, tq, 2, 4), _rand(kv_batch, tk, 2, 4), _rand(kv_batch, tk, 2, 4)
    assert torch.autograd.gradcheck(lambda *a: reference.prompt_attention(*a, 0.5, rows, 2)[0], (q, k, v))


def test_prompt_attention_saliency_is_the_mean_probability():
    q, k, v = _rand(1, 4, 2, 3, grad=False), _rand(1, 4, 2, 3, grad=False), _rand(1, 4, 2, 3, grad=False)
    _, saliency = reference.prompt_attention(q, k, v, 0.7, (1, 2), 1)
    probs = torch.einsum("bqhd,bkhd->bhqk", q, k).mul(0.7).softmax(-1)
    expected = (probs[0, :, 1, 1:] + probs[0, :, 2, 1:]).sum(0) / 4
    torch.testing.assert_close(saliency[0], expected.float())
    assert saliency.dtype == torch.float32 and not saliency.requires_grad


def test_ae_update_gradients_and_rows():
    tokens, attn_out, scale = _rand(2, 10, 4), _rand(2, 10, 4), _rand(())
    saliency = torch.rand(2, 6)  # 10 tokens = 1 prefix + 3 prompts + 6 patches
    assert torch.autograd.gradcheck(lambda *a: reference.ae_update(*a[:2], saliency, a[2], 1, 3, 2),
                                    (tokens, attn_out, scale))
    out = reference.ae_update(tokens, attn_out, saliency, scale, 1, 3, 2).detach()
    h = (tokens + attn_out).detach()
    u = scale.detach() * h[:, 1:4].mean(1)
    for b in range(2):
        top = set((saliency[b].topk(2).indices + 4).tolist())
        for row in range(10):
            torch.testing.assert_close(out[b, row], h[b, row] + (u[b] if row in top else 0))
