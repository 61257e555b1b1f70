"""meshlet's control plane: the service registry, policies and the REST admin API."""
