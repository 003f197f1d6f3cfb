"""`var-prep` subcommands: one module each, defining NAME, HELP, add_arguments(parser) and run(args)."""
