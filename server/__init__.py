"""The mobiserve server, layer by layer:

- `transport/`: the gRPC servicer (proto <-> domain) and the one place errors become statuses;
- `batching/`: the asyncio dynamic batcher that turns queued images into model batches;
- `runtime/`: onnxruntime sessions and the model that ties labels, pre- and post-processing together;
- `processing/`: the model card's preprocessing (decode, resize, crop, normalise) and postprocessing.

`app.py` wires them into a grpc.aio server; `cli.py` is the `mobiserve` command.
"""
