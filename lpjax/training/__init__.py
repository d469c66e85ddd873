"""Training as a library: settings (`settings`), data (`data`), the optimizer (`optimizer`), the compiled step and
evaluation (`programs`), the run directory and its states (`rundir`) and the loop (`loop`). `python -m lpjax.train`
and `python -m lpjax.finetune` are thin command lines over it (their shared flags: `training/cli.py`)."""
