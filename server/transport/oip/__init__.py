"""The Open Inference Protocol (KServe v2 gRPC, as Triton serves it) beside mobiserve.v1.Classifier."""
