"""The Open Inference Protocol (KServe v2 gRPC) stubs: package `inference`, as the protocol names it."""
