"""DRL pretraining: a time-conditioned encoder and a latent-conditioned score network trained jointly (method §1-5);
or, in `score-only` mode, a plain diffusion model whose denoiser features are probed instead (trajrep.denoiser)."""

import os
from collections.abc import Iterable
from typing import Literal

import lightning.pytorch as pl
import torch

from trajrep.data.base import ImageDataModule
from trajrep.diffusion import VESDE
from trajrep.errors import TrajrepError
from trajrep.nn.encoder import TimeConditionedWRN
from trajrep.nn.unet import ScoreUNet

EncoderMode = Literal["probabilistic-drl", "reg-drl", "noreg-drl", "score-only"]
MatmulPrecision = Literal["highest", "high", "medium"]
AdamImpl = Literal["for-loop", "foreach", "fused"]
ENCODER_MODES = ("probabilistic-drl", "reg-drl", "noreg-drl", "score-only")


def dsm_loss(h: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-example 0.5 * sum_pixels (sigma * s + eps)^2 with s = h / sigma, i.e. 0.5 * ||h + eps||^2."""
    return 0.5 * (h + noise).flatten(1).pow(2).sum(dim=1)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-example KL(N(mu, diag exp(logvar)) || N(0, I)), summed over latent dimensions."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


class PretrainModule(pl.LightningModule):
    """Trains E(x0, t) so that s(x_t, sigma(t), E(x0, t)) can denoise; the encoder is what later stages keep.

    `image_channels` and `image_size` are linked from the datamodule by the CLI. The latent size d_z is the
    encoder's last-stage width: 64 * `widen_factor` unless `latent_dim` sets it apart from the body's width.

    Fast paths (each measured by benchmarks/pretrain.py; none changes the model or its checkpoints):
    `compile` compiles the encoder and the score net (not this module), `channels_last` stores images and conv
    weights NHWC, `matmul_precision` is torch.set_float32_matmul_precision ("high" allows TF32 on NVIDIA GPUs),
    `adam_impl` picks torch's Adam kernel (None: torch's choice, foreach on GPUs; "fused" cannot be combined with
    the Trainer's gradient clipping under mixed precision, which Lightning refuses).
    Mixed precision is the Trainer's `precision: bf16-mixed`; the data's `device_resident` keeps images on the GPU.

    Args:
        image_channels: channels of the images (set from the data).
        image_size: height and width of the images (set from the data).
        mode: reg-drl (L1 on E), probabilistic-drl (Gaussian posterior, KL to N(0, I)), noreg-drl (no
            regulariser), or score-only: no encoder, the score U-Net alone (the same SDE and loss), a backbone for
            denoiser features.
        encoder_depth: depth of the Wide-ResNet encoder (6n + 4).
        widen_factor: width multiplier k of the encoder's stages (16k, 32k, 64k channels).
        latent_dim: size d_z of E(x0, t); None gives the last stage's width, 64k.
        nf: base channel count of the score U-Net.
        ch_mult: channel multiplier of each U-Net resolution.
        num_res_blocks: residual blocks per U-Net resolution.
        attn_resolutions: resolutions (px) whose U-Net blocks have self-attention.
        dropout: dropout inside the U-Net's residual blocks.
        latent_bottleneck: also inject E(x0, t) at the U-Net's lowest resolution.
        sigma_min: noise std at t = 0 of the VE SDE.
        sigma_max: noise std at t = 1 of the VE SDE.
        t_min: smallest t drawn in training (avoids sigma -> sigma_min exactly).
        reg_weight: weight of the L1 or KL term beside the denoising loss.
        lr: Adam learning rate after warm-up.
        warmup_steps: steps of linear learning-rate warm-up.
        compile: torch.compile the encoder and the score net; auto: only on CUDA, where it pays (on a CPU
            compiling the paper's networks takes longer than minutes of training).
        channels_last: NHWC memory layout for images and conv weights.
        matmul_precision: torch.set_float32_matmul_precision; None leaves torch's setting.
        adam_impl: Adam kernel (for-loop, foreach, fused); None lets torch choose.
    """

    def __init__(
        self,
        image_channels: int = 3,
        image_size: int = 32,
        mode: EncoderMode = "reg-drl",
        encoder_depth: int = 28,
        widen_factor: float = 2.0,
        latent_dim: int | None = None,
        nf: int = 16,
        ch_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.1,
        latent_bottleneck: bool = True,
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        t_min: float = 1e-5,
        reg_weight: float = 1e-5,
        lr: float = 2e-4,
        warmup_steps: int = 5000,
        compile: bool | Literal["auto"] = False,
        channels_last: bool = False,
        matmul_precision: MatmulPrecision | None = None,
        adam_impl: AdamImpl | None = None,
    ) -> None:
        super().__init__()
        if mode not in ENCODER_MODES:
            raise TrajrepError(f"unknown encoder mode {mode!r}; choose one of {', '.join(ENCODER_MODES)}")
        if lr <= 0:
            raise TrajrepError(f"learning rate must be positive, got lr={lr}")
        self.save_hyperparameters()
        self.sde = VESDE(sigma_min, sigma_max, t_min)
        self.encoder = None if mode == "score-only" else TimeConditionedWRN(
            image_channels, encoder_depth, widen_factor, probabilistic=mode == "probabilistic-drl",
            latent_dim=latent_dim)
        self.score_net = ScoreUNet(image_channels, image_size, self.latent_dim, nf, tuple(ch_mult), num_res_blocks,
                                   tuple(attn_resolutions), dropout, latent_bottleneck)

    def configure_model(self) -> None:
        # Idempotent: Lightning's EMA (WeightAveraging) calls this hook too, before the Trainer does.
        if self.hparams.matmul_precision is not None:  # process-wide: put back in teardown
            self.__dict__.setdefault("_previous_matmul_precision", torch.get_float32_matmul_precision())
            torch.set_float32_matmul_precision(self.hparams.matmul_precision)
        if self.hparams.channels_last:
            self.to(memory_format=torch.channels_last)
        if self.compiles:  # the inner networks: Lightning's hooks stay eager and checkpoints keep their keys
            for network in (self.encoder, self.score_net):
                if network is not None:
                    network.compile()

    @property
    def compiles(self) -> bool:
        """Whether configure_model compiles: `compile` true, or auto on a CUDA device."""
        if self.hparams.compile != "auto":
            return self.hparams.compile
        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        return device.type == "cuda"

    def teardown(self, stage: str) -> None:
        previous = self.__dict__.pop("_previous_matmul_precision", None)
        if previous is not None:
            torch.set_float32_matmul_precision(previous)

    @property
    def latent_dim(self) -> int:
        """d_z; 0 for a score-only model."""
        return 0 if self.encoder is None else self.encoder.feature_dim

    def require_encoder(self, what: str, instead: str = "probe its denoiser features (--data.source=denoiser)"
                        ) -> TimeConditionedWRN:
        """The encoder, or a clear error for a score-only model, which has none."""
        if self.encoder is None:
            raise TrajrepError(f"{what} reads E(x0, t), and this model is score-only (it has no encoder): {instead}")
        return self.encoder

    def encode(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Latent fed to the score net and its regulariser per example, according to the encoder mode (a
        score-only model: no latent, no regulariser)."""
        mode = self.hparams.mode
        if mode == "score-only":
            return None, torch.zeros(x0.shape[0], device=x0.device, dtype=x0.dtype)
        out = self.encoder(x0, self.sde.log_sigma(t))
        if mode == "probabilistic-drl":
            mu, logvar = out.chunk(2, dim=1)
            z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
            return z, gaussian_kl(mu, logvar)
        if mode == "reg-drl":
            return out, out.abs().sum(dim=1)
        return out, torch.zeros(out.shape[0], device=out.device, dtype=out.dtype)

    @torch.no_grad()
    def calibrate_encoder_batchnorm(self, batches: Iterable[torch.Tensor], generator: torch.Generator) -> int:
        """Set the encoder's BatchNorm running statistics to their cumulative average over `batches` of normalised
        training images, each image at its own t ~ U(t_min, 1): what a random-features control needs, since the
        initial statistics (mean 0, variance 1) leave eval-mode features almost constant across images.
        Returns the number of images seen; the encoder is left in eval mode."""
        encoder = self.require_encoder("BatchNorm calibration", "a random-weights backbone needs none")
        norms = [m for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in norms]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative moving average
        encoder.train()
        seen = 0
        for x0 in batches:
            t = self.sde.sample_time(x0.shape[0], device=x0.device, generator=generator)
            encoder(x0, self.sde.log_sigma(t))
            seen += x0.shape[0]
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        encoder.eval()
        return seen

    def loss_terms(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-example DSM and regulariser terms for given times and noise (deterministic given its inputs)."""
        z, reg = self.encode(x0, t)
        h = self.score_net(self.sde.perturb(x0, t, noise), self.sde.log_sigma(t), z)
        return {"dsm": dsm_loss(h, noise), "reg": reg}

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x0 = batch[0]
        t = self.sde.sample_time(x0.shape[0], device=x0.device)
        noise = torch.randn_like(x0)  # drawn before any layout change: randn_like fills memory in storage order
        if self.hparams.channels_last:
            x0, noise = (v.contiguous(memory_format=torch.channels_last) for v in (x0, noise))
        terms = self.loss_terms(x0, t, noise)
        dsm, reg = terms["dsm"].mean(), terms["reg"].mean()
        loss = dsm + self.hparams.reg_weight * reg
        if not torch.isfinite(loss):
            raise TrajrepError(f"non-finite {stage} loss ({loss.item()}) at step {self.global_step}; lower the "
                               "learning rate or check the data normalisation")
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=not on_step)
        self.log_dict({f"{stage}/dsm": dsm, f"{stage}/reg": reg}, on_step=on_step, on_epoch=not on_step)
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def _evaluation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, stage: str) -> None:
        """The same t and noise for a batch at every evaluation (comparable losses), drawn from a forked RNG so
        that evaluating leaves the training RNG stream, which checkpoints restore, untouched."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(batch_idx)
            self._step(batch, stage)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluation_step(batch, batch_idx, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluation_step(batch, batch_idx, "test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The seed LightningCLI's seed_everything used, so that probe results can name their pretraining seed.
        seed = os.environ.get("PL_GLOBAL_SEED")
        checkpoint["pretrain_seed"] = None if seed is None else int(seed)
        # The RNG stream of training (t and noise draws): a resumed run continues it exactly.
        checkpoint["rng_state"] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():  # this process's device (ranks are seeded alike)
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("rng_state")
        if state is None:
            return
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])

    def configure_optimizers(self):
        clip, precision = self.trainer.gradient_clip_val, str(self.trainer.precision)
        if self.hparams.adam_impl == "fused" and clip and precision.endswith("-mixed"):
            raise TrajrepError(f"adam_impl 'fused' cannot be combined with gradient clipping (gradient_clip_val "
                               f"{clip}) under precision {precision}: the fused kernel unscales gradients itself, "
                               f"so Lightning cannot clip them; use --model.init_args.adam_impl=foreach, or "
                               f"--trainer.gradient_clip_val=null")
        impl = {None: {}, "for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, betas=(0.9, 0.999), eps=1e-8,
                                     **impl[self.hparams.adam_impl])
        warmup = max(self.hparams.warmup_steps, 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


# Training images whose statistics calibrate the untrained control's BatchNorm (cumulative average).
CALIBRATION_IMAGES = 2000


def randomize_untrained_score_net(model: PretrainModule) -> str:
    """A score-only model's random-features control: every layer of its untrained score net random (the layers
    initialised near zero are drawn again); returns the sentence its records carry."""
    model.score_net.draw_residual_closers_()
    return ("weights untrained, every layer random: the layers that start near zero for training (each residual "
            "branch's last layer, the output layer) drawn at DDPM's scale 1")


def calibrate_untrained(model: PretrainModule, images: ImageDataModule, seed: int,
                        num_images: int = CALIBRATION_IMAGES, batch_size: int = 100) -> str:
    """Calibrate an untrained model's encoder BatchNorm on a seeded sample of training images; returns the
    sentence its records carry."""
    generator = torch.Generator().manual_seed(seed)
    pixels, _ = images.stacked("train")
    rows = torch.randperm(len(pixels), generator=generator)[:num_images]
    seen = model.calibrate_encoder_batchnorm((images.normalize(pixels[part]) for part in rows.split(batch_size)),
                                             generator)
    return (f"BatchNorm running statistics: cumulative average over {seen} training images, each at t ~ U(0, 1), "
            "weights untrained")
