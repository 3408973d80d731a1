"""mobiserve: MobileNetV2 image classification over gRPC.

This folder is the root of the `mobiserve` import package because the .proto's own path
(`mobiserve/v1/classifier.proto`) fixes where its generated stubs live: `mobiserve.v1`.
The other parts have folders of their own: `mobiserve.common` (`common/`), `mobiserve.client`
(`client/`), `mobiserve.server` (`server/`), `mobiserve.bench` (`bench/`).
"""

__version__ = "0.1.0"
