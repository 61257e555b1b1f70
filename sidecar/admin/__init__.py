"""The admin and metrics ports: endpoints, who may call them, the Prometheus collector."""
