"""The `xctdiff` command line and the jobs behind its commands: `cli` (the parser and one handler per
command), `reconstruct_job` (a file or a folder of films -> CT files, with progress and exit codes),
`demo` and `benchmark`. Nothing here is imported by the engine itself; the package imports nothing
heavy, so `xctdiff --help` stays quick."""
