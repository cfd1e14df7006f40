"""Wire translations between the compat APIs (Anthropic Message Batches) and Headrace's canonical forms."""
