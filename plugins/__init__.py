"""pgrelay's built-in plugins (installed as the pgrelay_plugins package, entry-point group `pgrelay`)."""
