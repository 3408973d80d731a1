"""The asyncio dynamic batcher."""

from mobiserve.server.batching.batcher import Answered, Batcher, Ran, Stages
from mobiserve.server.batching.lanes import Lane

__all__ = ["Answered", "Batcher", "Lane", "Ran", "Stages"]
