"""The sweep launcher: sweep file (spec) -> submitit jobs (job) -> run dirs (runs) -> report."""
