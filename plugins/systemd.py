"""systemd integration: sd_notify readiness, reload, status and watchdog messages; a built-in plugin."""
