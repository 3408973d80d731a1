"""The asyncio dynamic batcher."""

from mobiserve.server.batching.batcher import Admission, Batched, Batcher

__all__ = ["Admission", "Batched", "Batcher"]
