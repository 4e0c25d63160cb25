"""Run folders: a run is a folder, and the folder is the truth (docs/design.md).

Everything we decide about a run folder lives in this package, and none of it needs torch, so the UI,
the CLI and the worker all read and judge a run the same way::

    layout.py       the names of the files and folders in a run
    info.py         run.json (RunInfo), the run's recipe.toml, creating a run
    listing.py      finding and listing runs, and the state to show (a dead worker's run is interrupted)
    control.py      starting, resuming and stopping a run's worker process
    checkpoints.py  sealing a checkpoint, which ones are complete, which to keep, disk room for them
    resume.py       which checkpoint a resume takes, and whether the run may continue from it

The engine saves the model and optimizer state (Trainer) and calls in here to seal, check and rotate.
An import-linter contract in pyproject.toml keeps torch out of this package.
"""
