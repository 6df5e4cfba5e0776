"""kubesloth: full fine-tuning of LLMs on one GPU per job, on Kubernetes."""

__version__ = "0.1.0"
