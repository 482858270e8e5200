"""The application layer, one module per job: flags (the shared flags and the one-line parser), setup
(device, model, explainer, UCAG and run identity built from the flags), lifecycle (a script's process: exit
codes, signals, warnings), evaluation_run (the dataset scripts' run). Only the scripts import it; it imports
every library package."""
