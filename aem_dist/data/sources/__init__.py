"""Input formats that become datasets (one module per format, each yielding bags)."""
