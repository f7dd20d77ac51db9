"""A release as the wire format defines it (docs/format.md): its OCI documents
(`documents`), signing keys (`keys`), signature payloads and manifests (`signing`), and
the pure policy that decides whether a release index is accepted (`policy`)."""
