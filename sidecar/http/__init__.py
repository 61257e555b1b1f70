"""The HTTP/1 codec: heads parsed and written, bodies framed; no sockets."""
