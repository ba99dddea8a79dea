"""Input/output at the edges: volume specs, lazy box reads, atomic writes."""
