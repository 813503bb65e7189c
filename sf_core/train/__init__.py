"""Self Forcing training: self rollout with the KV cache, video-level DMD loss, critic, LoRA trainer."""

from .losses import critic_loss, dmd_gradient, dmd_loss, sample_timesteps
from .trainer import TrainSettings, Trainer

__all__ = ["dmd_gradient", "dmd_loss", "critic_loss", "sample_timesteps", "TrainSettings", "Trainer"]
