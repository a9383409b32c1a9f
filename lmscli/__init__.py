"""lmscli: a local-LLM toolkit modelled on LM Studio's lms."""

__version__ = "0.1.0"
