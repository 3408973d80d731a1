"""The model card's offline workflows (no server): evaluate and quantize."""
