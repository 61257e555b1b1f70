"""What protects a service: its limits and counters, the retry budget."""
