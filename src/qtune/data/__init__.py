"""Reading data files into typed records, and batching them."""
