import pytest
import torch

from sf_core.wan.attention import available_backends, resolve_backend, sdpa


def _naive(q, k, v, key_mask=None):
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / q.shape[-1] ** 0.5
    if key_mask is not None:
        s = s.masked_fill(~key_mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.float())


def test_sdpa_matches_naive_attention_with_and_without_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 16, generator=g) for _ in range(3))
    k, v = torch.cat([k, k * 2], 1), torch.cat([v, -v], 1)
    mask = torch.tensor([True, False] * 5)
    assert torch.allclose(sdpa(q, k, v), _naive(q, k, v), atol=1e-5)
    assert torch.allclose(sdpa(q, k, v, mask), _naive(q, k, v, mask), atol=1e-5)


def test_auto_picks_sdpa_on_cpu_and_refuses_missing_backends():
    assert resolve_backend("auto", "cpu")[0] == "sdpa"
    with pytest.raises(ValueError, match="not available"):
        resolve_backend("flash2", "cpu")
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("xformers", "cpu")


@pytest.mark.skipif(len(available_backends()) == 1, reason="no flash-attn installed on a CUDA device")
@pytest.mark.parametrize("name", [b for b in ("flash2", "flash3") if b in available_backends()])
def test_flash_agrees_with_sdpa(name):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 300, 12, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    _, fn = resolve_backend(name, "cuda")
    assert (fn(q, k, v).float() - sdpa(q, k, v).float()).abs().max() < 2e-2
