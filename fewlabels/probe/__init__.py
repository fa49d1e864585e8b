"""Probes: select -> query -> fit -> evaluate."""
