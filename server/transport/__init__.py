"""gRPC transport: thin servicers converting proto <-> domain, and the status mapping."""
