"""meshlet's sidecar: the data-path proxy beside every service."""
