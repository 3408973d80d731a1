"""The mobiserve server, layer by layer (each imports only those below it; pyproject.toml's
import-linter contracts say so, and `make lint` checks them):

- `cli.py`: `mobiserve serve`; `workers.py`: `--workers N`, the supervisor of N server processes;
  `workflows/`: the offline commands (`evaluate`, `quantize`);
- `app.py`: wires config -> models -> batchers -> a grpc.aio server and runs it until a signal,
  with its helpers: `tls.py` (credentials), `binding.py` (the port), `upkeep.py` (background
  tasks), `handshake.py` (a worker's side of `--workers`);
- `transport/`: the gRPC servicers (proto <-> domain), the request handling they share
  (`calls.py`: deadlines, counting, streams, drain) and the one place errors become statuses;
- `serving.py`: the domain layer, a served model and its typed description;
- `config.py`: the server's and models' settings;
- `batching/`: the asyncio dynamic batcher that turns queued images into model batches;
  `runtime/`: onnxruntime sessions and the loaded model;
- `processing/`: the model card's preprocessing (decode, resize, crop, normalise) and postprocessing;
- underneath all: `errors`, `metrics`, `metrics_http`, `logs`, `threads`, `memory`, `cores`.
"""
