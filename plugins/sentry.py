"""Sentry error reporting (sentry_dsn): a built-in plugin on notification hooks; secrets are scrubbed."""
