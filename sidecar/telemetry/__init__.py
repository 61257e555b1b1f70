"""What the data path records as it goes: request counters and the access log."""
