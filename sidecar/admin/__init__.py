"""The admin and metrics ports: their small HTTP/1.1 server, endpoints, who may call them, the
Prometheus metrics."""
