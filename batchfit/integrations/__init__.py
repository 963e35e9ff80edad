"""Integrations with training frameworks, each imported only when its package is installed:
`batchfit.integrations.lightning` and `batchfit.integrations.hf`."""
