"""The cache: content-addressed blobs, resumable partials, verified outputs the scheduler
boots from, and the records that make a warm boot a `stat`. `store` is the cache itself,
`admin` its listing, verification and garbage collection."""
