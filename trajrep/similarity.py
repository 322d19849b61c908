"""How much a representation changes along the trajectory: linear CKA between E(x, t_i) and E(x, t_j)."""

import torch


def linear_cka(representations: torch.Tensor, max_examples: int = 2000) -> torch.Tensor:
    """(T, T) linear CKA (Kornblith et al., 2019) between the representations at every pair of times.

    `representations` is (N, T, d); the first `max_examples` rows are used. 1 means the same representation up to
    rotation and scale, 0 no linear relation. A trajectory that does not change along t gives all ones.
    """
    x = representations[:max_examples].double()
    x = x - x.mean(dim=0, keepdim=True)
    cross = torch.einsum("nid,nje->ijde", x, x)  # (T, T, d, d) cross-covariances
    squared = cross.pow(2).sum(dim=(-2, -1))
    norms = squared.diagonal().sqrt()
    return (squared / (norms[:, None] * norms[None, :])).float()


def mean_off_diagonal(matrix: torch.Tensor) -> float:
    """Mean over the pairs i != j (1.0 for a single time)."""
    size = matrix.shape[0]
    if size == 1:
        return 1.0
    return float((matrix.sum() - matrix.diagonal().sum()) / (size * (size - 1)))
