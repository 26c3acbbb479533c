"""Fused operators shared by the losses."""

from segkd.ops.channel_kl import BACKENDS, ChannelKLFunction, available_backends, channel_kl, resolve_backend
from segkd.ops.weighted_kl import WEIGHTINGS, WeightedChannelKLFunction, weighted_channel_kl

__all__ = [
    "BACKENDS",
    "WEIGHTINGS",
    "ChannelKLFunction",
    "WeightedChannelKLFunction",
    "available_backends",
    "channel_kl",
    "resolve_backend",
    "weighted_channel_kl",
]
