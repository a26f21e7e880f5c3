"""A team's own data: ingest, validate and report, prepare, synthetic benchmark world."""
