"""The wizard's screens (hardware, model, recipe, dataset, launch), the monitor, the runs list and dialogs."""
