"""onnxruntime sessions and the model: blocking code that runs in executor threads."""
