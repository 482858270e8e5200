"""The application layer: command-line flags, their checks, one-line errors, and building models,
explainers and evaluation rows from flags. Only the scripts import it; it imports every library package."""
