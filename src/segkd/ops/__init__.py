"""Fused operators shared by the losses."""

from segkd.ops.channel_kl import BACKENDS, ChannelKLFunction, available_backends, channel_kl, resolve_backend

__all__ = ["BACKENDS", "ChannelKLFunction", "available_backends", "channel_kl", "resolve_backend"]
