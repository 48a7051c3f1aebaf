"""What `--eval` derives from one cache of exit outputs: operating points, latency, conformal sets, the report."""
