"""`mobiserve bench`: the load-testing harness. It drives a server through the client's stubs and,
for its in-process references, loads the model with the server's own code; so it depends on
both and neither depends on it."""
