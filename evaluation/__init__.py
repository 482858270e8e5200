"""Data readers and metric functions used by the scripts (library code, no argparse)."""
