"""`mobiserve bench`: the load-testing harness (issue 4)."""
