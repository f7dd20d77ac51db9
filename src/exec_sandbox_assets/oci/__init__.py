"""OCI data model and transports. Knows nothing of exec-sandbox."""
