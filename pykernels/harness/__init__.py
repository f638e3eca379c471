"""The measuring harness: timers (timing), the device fingerprint and peaks (device), shape sweeps
(sweeps), result records and the journal (results), the correctness check of an output (verify), and one
case timed end to end (measure). Imports go one way: measure -> device -> timing; nothing here formats a
table or imports the pytest plugin, the reports or the CLI."""
