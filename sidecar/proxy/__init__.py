"""Moving requests: the listeners, the exchange of one request, upstream pools, routes."""
