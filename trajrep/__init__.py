"""trajrep: representations of images as functions of diffusion time, t -> E(x0, t)."""

__version__ = "0.1.0"
