"""The thin keys' `materialize` and `select` against the dense sum of their terms."""

from __future__ import annotations

import pytest
import torch

from samadapt.encoders.lowrank_decoder import _Lin, _Memo, _Shared, _Thin, _Vec

B, N, D, H, T, d, OUT = 3, 20, 12, 2, 3, 4, 10


def _terms(*, shared: bool, per_prompt_const: bool) -> list:
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    thin = _Thin(rand(B, H * T, N).softmax(1), rand(B, H, T, d), rand(H, d, D))
    terms = [(rand(B, N), thin), (rand(B, N), _Vec(rand(D))), (None, _Vec(rand(D)))]
    if shared:
        terms.insert(0, (rand(B, N), _Shared(rand(N, D))))
        terms.append((None, _Shared(rand(N, D))))
    if per_prompt_const:
        terms.append((None, _Vec(rand(B, D))))
    return terms


def _dense(terms: list) -> torch.Tensor:
    out = torch.zeros(B, N, D, dtype=torch.float64)
    for scale, basis in terms:
        if isinstance(basis, _Shared):
            rows = basis.m.expand(B, -1, -1)
        elif isinstance(basis, _Thin):
            z = torch.einsum("bhtd,hde->bhte", basis.coef, basis.basis).reshape(B, H * T, D)
            rows = basis.pt.transpose(1, 2) @ z
        else:
            rows = (basis.v if basis.v.dim() == 2 else basis.v.expand(B, -1))[:, None, :].expand(B, N, D)
        out += rows if scale is None else rows * scale[..., None]
    return out


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("per_prompt_const", [True, False])
def test_materialize_equals_the_dense_sum_of_the_terms(shared: bool, per_prompt_const: bool) -> None:
    terms = _terms(shared=shared, per_prompt_const=per_prompt_const)
    keys = _Lin(list(terms), memo=_Memo(), batch=B, n=N)
    dense = _dense(terms)
    torch.testing.assert_close(keys.materialize(), dense)
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(OUT, D, generator=g, dtype=torch.float64)
    for bias in (
        None,
        torch.randn(OUT, generator=g, dtype=torch.float64),
        torch.randn(N, OUT, generator=g, dtype=torch.float64),
    ):
        want = dense @ weight.T + (0 if bias is None else bias)
        torch.testing.assert_close(keys.materialize(weight, bias), want)


@pytest.mark.parametrize("idx", [[1, 2], [0, 2], [2], [0, 1, 2]])
def test_select_runs_and_gathers_give_the_selected_prompts_keys(idx: list[int]) -> None:
    terms = _terms(shared=True, per_prompt_const=True)
    keys = _Lin(list(terms), memo=_Memo(), batch=B, n=N)
    keys._left()  # computed row factors are carried into a selection
    dense = _dense(terms)
    chosen = keys.select(torch.tensor(idx))
    assert chosen.batch == len(idx)
    torch.testing.assert_close(chosen.materialize(), dense[idx])
