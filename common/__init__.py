"""What the client, the server and the harness share, with no dependency beyond the standard
library: the labels file, the labelled-folder convention, the model zoo's files, and the
`mobiserve` command that each installed part adds its subcommands to."""
