"""peftgen: compile a LoRA/QLoRA experiment spec into a plan, a script and a report."""

__version__ = "0.1.0"
