"""Paper tables and figures from raw result cells, beside the published numbers."""
