import torch

from trajrep.similarity import linear_cka, mean_off_diagonal


def test_linear_cka_sees_rotation_and_scale_as_the_same_and_independence_as_different():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(1500, 8, generator=generator)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=generator))
    independent = torch.randn(1500, 8, generator=generator)
    cka = linear_cka(torch.stack([base, 3 * base @ rotation, independent], dim=1))
    torch.testing.assert_close(cka.diagonal(), torch.ones(3))
    assert cka[0, 1] > 0.999 and cka[0, 2] < 0.05
    torch.testing.assert_close(cka, cka.T)
    assert abs(mean_off_diagonal(cka) - (2 * cka[0, 1] + 2 * cka[0, 2] + 2 * cka[1, 2]).item() / 6) < 1e-6
