"""Random box sets shared by the ops tests and the ops benchmark (which imports them from here)."""

import torch


def rpn_like_boxes(n: int, g: torch.Generator, objects: int = 30, extent: float = 400.0,
                   log_sizes=(2.5, 5.0)):
    """Proposals as an RPN makes them: ``n`` boxes in clusters of jittered boxes around
    ``objects`` objects of ``exp(log_sizes)`` px, in an ``extent``-pixel square; random scores."""
    centres = torch.rand(objects, 2, generator=g) * extent
    sizes = torch.exp(torch.empty(objects, 2).uniform_(*log_sizes, generator=g))
    which = torch.randint(0, objects, (n,), generator=g)
    c = centres[which] + torch.randn(n, 2, generator=g) * sizes[which] * 0.15
    s = sizes[which] * torch.exp(torch.randn(n, 2, generator=g) * 0.15)
    return torch.cat((c - s / 2, c + s / 2), 1), torch.rand(n, generator=g)


def uniform_boxes(n: int, g: torch.Generator, extent: float = 400.0, max_side: float = 101.0):
    """``n`` boxes with uniform random corners (sides 1..``max_side`` px); random scores."""
    xy = torch.rand(n, 2, generator=g) * extent
    wh = torch.rand(n, 2, generator=g) * (max_side - 1) + 1
    return torch.cat((xy, xy + wh), 1), torch.rand(n, generator=g)
