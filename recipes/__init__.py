"""Shipped recipe presets (TOML). Installed as ``tui_finetune.presets`` so a wheel finds them too."""
