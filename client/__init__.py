"""mobiserve's client library (placeholder until the client lands)."""
