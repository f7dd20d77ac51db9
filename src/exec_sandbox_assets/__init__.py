"""exec-sandbox VM assets, distributed as signed OCI artifacts."""
