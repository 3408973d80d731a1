"""The asyncio dynamic batcher."""

from mobiserve.server.batching.batcher import Answered, Batcher, Stages

__all__ = ["Answered", "Batcher", "Stages"]
