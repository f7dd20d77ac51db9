"""The floor every other layer stands on, importing nothing of the project: the error
tree (`errors`), durable writes (`fsutil`), the one parser of untrusted JSON
(`safejson`), server text made safe to show (`safetext`) and byte counts in
messages (`sizes`)."""
