"""Small shared helpers: checkpoint files, distributed setup, logging, plots."""
