"""The model card's pre- and post-processing, shared by the server and `mobiserve evaluate`."""
