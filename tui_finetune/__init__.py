"""tui-finetune: fine-tune an LLM on your own gaming PC. It fits, it finishes, it resumes."""

__version__ = "0.1.0"
